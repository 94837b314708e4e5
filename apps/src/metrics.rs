//! Training metrics Burn does not have: tokens per second, and the device memory Burn's
//! allocator holds (the number a GPU run's batch size is chosen by).

use std::sync::Arc;
use std::time::Instant;

use burn::tensor::{Device, TensorReadError};
use burn::train::SequenceOutput;
use burn::train::metric::state::{FormatOptions, NumericMetricState};
use burn::train::metric::{
    Adaptor, Metric, MetricAttributes, MetricMetadata, MetricName, Numeric, NumericAttributes,
    NumericEntry, SerializedEntry,
};

/// The token positions of a batch (`batch × sequence`, padding included, as trainers count).
pub struct TokenCount(pub usize);

impl Adaptor<TokenCount> for SequenceOutput {
    fn adapt(&self) -> TokenCount {
        TokenCount(self.targets.shape().num_elements())
    }
}

/// Tokens a second since the epoch's first batch: throughput that does not depend on the
/// batch size, so runs of different shapes compare.
#[derive(Clone)]
pub struct TokensPerSecond {
    name: MetricName,
    state: NumericMetricState,
    /// When the first batch of the epoch was seen, and the tokens since.
    start: Option<(Instant, usize)>,
}

impl TokensPerSecond {
    const UNIT: &str = "tokens/s";

    pub fn new() -> Self {
        Self {
            name: Arc::new("Tokens per Second".to_string()),
            state: NumericMetricState::default(),
            start: None,
        }
    }

    fn format(&self) -> FormatOptions {
        FormatOptions::new(self.name())
            .unit(Self::UNIT)
            .precision(0)
    }
}

impl Default for TokensPerSecond {
    fn default() -> Self {
        Self::new()
    }
}

impl Metric for TokensPerSecond {
    type Input = TokenCount;

    fn update(
        &mut self,
        item: &TokenCount,
        _metadata: &MetricMetadata,
    ) -> Result<SerializedEntry, TensorReadError> {
        // The clock starts at the first batch, whose own time is unknown: it is not counted.
        let rate = match &mut self.start {
            Some((start, tokens)) => {
                *tokens += item.0;
                *tokens as f64 / start.elapsed().as_secs_f64()
            }
            None => {
                self.start = Some((Instant::now(), 0));
                0.0
            }
        };
        self.state.update(rate, 1);
        Ok(self.state.compute_update(self.format()))
    }

    fn compute(&mut self) -> Result<SerializedEntry, TensorReadError> {
        Ok(self.state.compute_final(self.format()))
    }

    fn clear(&mut self) {
        self.start = None;
        self.state.reset();
    }

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: Some(Self::UNIT.to_string()),
            higher_is_better: true,
        }
        .into()
    }
}

impl Numeric for TokensPerSecond {
    fn value(&self) -> Option<NumericEntry> {
        Some(self.state.current_value())
    }

    fn running_value(&self) -> Option<NumericEntry> {
        Some(self.state.running_value())
    }

    fn final_value(&self) -> NumericEntry {
        self.state.final_value()
    }
}

/// GiB the device's allocator has reserved (live tensors, and pages kept for reuse), and the
/// most it has reserved in the run. Only for devices whose allocator reports it (CUDA, wgpu);
/// see [`DeviceMemory::new`].
#[derive(Clone)]
pub struct DeviceMemory {
    name: MetricName,
    device: Device,
    state: NumericMetricState,
    peak_gib: f64,
}

impl DeviceMemory {
    const UNIT: &str = "GiB";

    /// The metric of `device`, or `None` when its backend does not report its memory (Flex).
    pub fn new(device: &Device) -> Option<Self> {
        device.memory_pool_usage()?;
        Some(Self {
            name: Arc::new("Device Memory".to_string()),
            device: device.clone(),
            state: NumericMetricState::default(),
            peak_gib: 0.0,
        })
    }

    fn format(&self) -> FormatOptions {
        FormatOptions::new(self.name())
            .unit(Self::UNIT)
            .precision(2)
    }
}

impl Metric for DeviceMemory {
    type Input = ();

    fn update(
        &mut self,
        _item: &(),
        _metadata: &MetricMetadata,
    ) -> Result<SerializedEntry, TensorReadError> {
        let reserved = self.device.memory_pool_usage().map_or(0.0, |usage| {
            usage.bytes_reserved as f64 / (1u64 << 30) as f64
        });
        self.peak_gib = self.peak_gib.max(reserved);
        self.state.update(reserved, 1);
        let entry = self.state.compute_update(self.format());
        // The peak beside the current value, in the dashboard and the logs.
        Ok(SerializedEntry::new(
            format!("{} (peak {:.2} GiB)", entry.formatted, self.peak_gib),
            entry.serialized,
        ))
    }

    fn compute(&mut self) -> Result<SerializedEntry, TensorReadError> {
        Ok(self.state.compute_final(self.format()))
    }

    fn clear(&mut self) {
        self.state.reset();
    }

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: Some(Self::UNIT.to_string()),
            higher_is_better: false,
        }
        .into()
    }
}

impl Numeric for DeviceMemory {
    fn value(&self) -> Option<NumericEntry> {
        Some(self.state.current_value())
    }

    fn running_value(&self) -> Option<NumericEntry> {
        Some(self.state.running_value())
    }

    fn final_value(&self) -> NumericEntry {
        self.state.final_value()
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use burn::tensor::{Distribution, Tensor};

    use super::*;

    /// On a CubeCL device the metric reads the allocator: a 64 MiB tensor shows, and stays in
    /// the peak after it is dropped.
    #[test]
    fn device_memory_follows_the_allocator() {
        let device = crate::device("wgpu").unwrap();
        let mut metric = DeviceMemory::new(&device).expect("wgpu reports its memory");
        let read = |metric: &mut DeviceMemory| {
            let metadata = MetricMetadata {
                progress: burn::data::dataloader::Progress {
                    items_processed: 1,
                    items_total: 1,
                    unit: None,
                },
                iteration: Some(1),
                lr: None,
            };
            metric.update(&(), &metadata).unwrap();
            metric.value().unwrap().current()
        };
        let before = read(&mut metric);
        let tensor = Tensor::<1>::random([16 << 20], Distribution::Default, &device);
        let _ = tensor.clone().sum().into_scalar::<f32>();
        let with_tensor = read(&mut metric);
        assert!(
            with_tensor - before >= 0.06,
            "{before} -> {with_tensor} GiB"
        );
        assert!(metric.peak_gib >= with_tensor);
        drop(tensor);
    }
}
