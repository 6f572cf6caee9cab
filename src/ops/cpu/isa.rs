//! The CPU's instruction set, asked once, here and nowhere else: every kernel with a form for a
//! level asks [`Isa::current`]. `ALEXNET_ISA=avx512|avx2|generic` holds the process to a level
//! (for the tests, which run the kernels at every level the CPU has, and for benchmarks); a level
//! the CPU lacks is refused.

use std::sync::OnceLock;

/// The environment variable that chooses the level.
pub const ISA_VARIABLE: &str = "ALEXNET_ISA";

/// An instruction-set level the kernels are written for, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// The compiler's baseline: SSE2 on x86-64, NEON on aarch64.
    Generic,
    /// AVX2 with FMA, 8 lanes: Intel since Haswell, AMD since Zen.
    Avx2,
    /// AVX-512F, 16 lanes: Intel's server chips since Skylake-SP, AMD since Zen 4.
    Avx512,
}

impl Isa {
    pub const ALL: [Isa; 3] = [Isa::Generic, Isa::Avx2, Isa::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Generic => "generic",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// The best level this CPU has, asked of it once.
    pub fn detected() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    return Isa::Avx512;
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    return Isa::Avx2;
                }
            }
            Isa::Generic
        })
    }

    /// Every level this CPU can run, lowest first.
    pub fn supported() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|&isa| isa <= Isa::detected()).collect()
    }

    /// The level `ALEXNET_ISA` asks for (the detected one when it is not set), checked.
    pub fn from_env() -> anyhow::Result<Isa> {
        let Ok(wanted) = std::env::var(ISA_VARIABLE) else { return Ok(Isa::detected()) };
        let Some(isa) = Isa::ALL.into_iter().find(|isa| isa.name() == wanted.trim()) else {
            anyhow::bail!("{ISA_VARIABLE}={wanted:?} is not a level: use generic, avx2 or avx512")
        };
        if isa > Isa::detected() {
            anyhow::bail!("{ISA_VARIABLE}={} asks for more than this CPU has ({})", isa.name(), Isa::detected().name())
        }
        Ok(isa)
    }

    /// The level the kernels run at, fixed on first use: `ALEXNET_ISA`'s, else the detected one.
    /// (The command line refuses a bad `ALEXNET_ISA` before this; a library user gets a warning
    /// and the detected level.)
    pub fn current() -> Isa {
        static CURRENT: OnceLock<Isa> = OnceLock::new();
        *CURRENT.get_or_init(|| {
            Isa::from_env().unwrap_or_else(|e| {
                eprintln!("warning: {e}; running at {}", Isa::detected().name());
                Isa::detected()
            })
        })
    }

    /// Whether the AVX-512 kernels run: the level is AVX-512, so the CPU has AVX-512F.
    pub fn avx512() -> bool {
        Isa::current() == Isa::Avx512
    }

    /// Whether the AVX2 + FMA kernels may run: the level is at least AVX2.
    pub fn avx2() -> bool {
        Isa::current() >= Isa::Avx2
    }
}

/// Runs the test binary this is called from again at every level the CPU has below its best
/// (`ALEXNET_ISA`), all its tests but `this` one, and asserts that they pass: so the kernels
/// of every level are tested on a machine that would otherwise only run its best. A no-op
/// inside such a run.
#[doc(hidden)]
pub fn rerun_tests_below_the_best_level(this: &str) {
    if std::env::var_os(ISA_VARIABLE).is_some() {
        return;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    for isa in Isa::supported().into_iter().filter(|&isa| isa < Isa::detected()) {
        let out = std::process::Command::new(&exe)
            .env(ISA_VARIABLE, isa.name())
            .args(["--skip", this])
            .output()
            .expect("run the test binary again");
        let report = String::from_utf8_lossy(&out.stdout);
        let tail: Vec<&str> = report.lines().rev().take(40).collect();
        assert!(
            out.status.success(),
            "tests at {ISA_VARIABLE}={}:\n{}\n{}",
            isa.name(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "{ISA_VARIABLE}={}: {}",
            isa.name(),
            report.lines().rfind(|l| l.starts_with("test result")).unwrap_or("")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_pass_their_tests_at_every_level() {
        rerun_tests_below_the_best_level("the_kernels_pass_their_tests_at_every_level");
    }

    #[test]
    fn a_level_above_the_cpus_is_refused() {
        // only testable where the CPU lacks a level; the names parse either way
        assert!(Isa::ALL.iter().all(|isa| Isa::ALL.iter().filter(|i| i.name() == isa.name()).count() == 1));
        assert!(Isa::supported().contains(&Isa::current()));
    }
}
