//! `--device cpu|cuda:N` and `--tower-devices A,B`: where the net runs.

use anyhow::bail;
use candle_core::Device;

use crate::model::{LrnScope, Placement};

/// The device flags every command that runs the net shares.
#[derive(clap::Args, Clone, Debug)]
pub struct DeviceArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Two-tower presets: tower A's and tower B's devices, e.g. `cuda:0,cuda:1` as on the
    /// paper's two GPUs (only the paper's cross-tower transfers go between them). Default:
    /// both on --device.
    #[arg(long, value_name = "A,B")]
    pub tower_devices: Option<String>,
}

impl DeviceArgs {
    /// The placement these flags ask for, every device checked.
    pub fn placement(&self, lrn_scope: LrnScope) -> anyhow::Result<Placement> {
        let towers = match &self.tower_devices {
            None => {
                let device = parse_device(&self.device)?;
                [device.clone(), device]
            }
            Some(spec) => match spec.split(',').collect::<Vec<_>>()[..] {
                // one device for one name: opened twice, Candle would see two devices and copy
                [a, b] if a.trim() == b.trim() => {
                    let device = parse_device(a.trim())?;
                    [device.clone(), device]
                }
                [a, b] => [parse_device(a.trim())?, parse_device(b.trim())?],
                _ => bail!(
                    "--tower-devices takes two devices, tower A's and tower B's, e.g. cuda:0,cuda:1; got `{spec}`"
                ),
            },
        };
        Ok(Placement { towers, lrn_scope })
    }
}

/// Parses `cpu`, `cuda` or `cuda:N` into a Candle device, with a clear error when CUDA is
/// not available in this build or on this machine.
pub fn parse_device(spec: &str) -> anyhow::Result<Device> {
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => match spec.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => bail!("unknown device `{spec}`: expected cpu, cuda or cuda:N"),
        },
    };
    if !candle_core::utils::cuda_is_available() {
        bail!(
            "device `{spec}` asked for, but this alexnet binary was built without CUDA support; \
             rebuild with `cargo build --release --features cuda` or use --device cpu"
        )
    }
    check_driver(spec)?;
    // cudarc panics (rather than failing) on some driver errors; turn those into errors too.
    match std::panic::catch_unwind(|| Device::new_cuda(ordinal)) {
        Ok(Ok(device)) => Ok(device),
        Ok(Err(err)) => bail!("cannot open device `{spec}`: {err}"),
        Err(panic) => {
            let why = panic.downcast_ref::<String>().map(String::as_str).or(panic.downcast_ref::<&str>().copied());
            bail!("cannot open device `{spec}`: {}", why.unwrap_or("the CUDA driver failed"))
        }
    }
}

/// A CUDA build opens the NVIDIA driver at run time (cudarc's dynamic loading), and panics
/// when it is missing. Look for it first, so a machine without a GPU gets a sentence.
fn check_driver(spec: &str) -> anyhow::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let found = ["libcuda.so", "libcuda.so.1"].iter().any(|name| {
            let name = std::ffi::CString::new(*name).expect("no NUL in a library name");
            // SAFETY: dlopen with a valid C string; the handle is closed again at once.
            unsafe {
                let handle = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
                if !handle.is_null() {
                    libc::dlclose(handle);
                }
                !handle.is_null()
            }
        });
        if !found {
            bail!(
                "device `{spec}` asked for, but no NVIDIA driver was found on this machine \
                 (libcuda.so.1 could not be loaded): no GPU here? Use --device cpu"
            )
        }
    }
    Ok(())
}
