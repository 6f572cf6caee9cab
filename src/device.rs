//! `--device cpu|cuda:N`.

use anyhow::bail;
use candle_core::Device;

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
    Ok(Device::new_cuda(ordinal)?)
}
