//! What the GPU benchmarks share: medians and the device allocator's numbers.

use anyhow::{Context, Result};
use burn::tensor::Device;

/// Whether this build has Burn's kernel fusion (feature `fusion`), for the benchmarks' reports.
pub const FUSION: &str = if cfg!(feature = "fusion") {
    "on"
} else {
    "off"
};

/// The median of `samples` (NaN for none).
pub fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples.get(samples.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Bytes the device's pools hand out now.
pub fn memory_in_use(device: &Device) -> Result<u64> {
    Ok(device
        .memory_pool_usage()
        .context("the device reports no memory pools")?
        .bytes_in_use)
}

/// The most bytes the device's pools ever reserved (whole pages, as torch's
/// `max_memory_reserved` counts them): the paged pools' peaks, plus what the
/// persistent pool (the model's weights, see `Llama::load`) holds now.
pub fn peak_reserved(device: &Device) -> Result<u64> {
    let pools = device
        .memory_pool_report()
        .context("the device reports no memory pools")?;
    let reserved = device
        .memory_pool_usage()
        .context("the device reports no memory pools")?
        .bytes_reserved;
    let paged_now: u64 = pools.iter().map(|p| p.page_size * p.pages).sum();
    let paged_peak: u64 = pools.iter().map(|p| p.page_size * p.pages_peak).sum();
    Ok(paged_peak + reserved.saturating_sub(paged_now))
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

pub fn gib(bytes: u64) -> f64 {
    mib(bytes) / 1024.0
}
