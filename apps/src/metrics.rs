//! Training metrics Burn does not have: tokens per second, and the device memory Burn's
//! allocator holds (the number a GPU run's batch size is chosen by). Both are a [`Gauge`]: a
//! number sampled at every step, averaged like Burn's numeric metrics.

use std::sync::Arc;
use std::time::Instant;

use burn::tensor::{Device, TensorReadError};
use burn::train::SequenceOutput;
use burn::train::metric::state::{FormatOptions, NumericMetricState};
use burn::train::metric::{
    Adaptor, Metric, MetricAttributes, MetricMetadata, MetricName, Numeric, NumericAttributes,
    NumericEntry, SerializedEntry,
};

/// What a [`Gauge`] reads at each step.
pub trait Sampler: Clone + Send + Sync {
    type Input;
    const NAME: &str;
    const UNIT: &str;
    const PRECISION: usize;
    const HIGHER_IS_BETTER: bool;

    fn sample(&mut self, input: &Self::Input) -> f64;

    /// Called at the end of each epoch.
    fn clear(&mut self) {}

    /// Shown after the value in the dashboard and the logs.
    fn note(&self) -> Option<String> {
        None
    }
}

/// A numeric metric of one [`Sampler`].
#[derive(Clone)]
pub struct Gauge<S> {
    name: MetricName,
    state: NumericMetricState,
    sampler: S,
}

impl<S: Sampler> Gauge<S> {
    pub fn new(sampler: S) -> Self {
        Self {
            name: Arc::new(S::NAME.to_string()),
            state: NumericMetricState::default(),
            sampler,
        }
    }

    fn format(&self) -> FormatOptions {
        FormatOptions::new(self.name())
            .unit(S::UNIT)
            .precision(S::PRECISION)
    }
}

impl<S: Sampler> Metric for Gauge<S> {
    type Input = S::Input;

    fn update(
        &mut self,
        item: &S::Input,
        _metadata: &MetricMetadata,
    ) -> Result<SerializedEntry, TensorReadError> {
        let value = self.sampler.sample(item);
        self.state.update(value, 1);
        let entry = self.state.compute_update(self.format());
        Ok(match self.sampler.note() {
            Some(note) => {
                SerializedEntry::new(format!("{} ({note})", entry.formatted), entry.serialized)
            }
            None => entry,
        })
    }

    fn compute(&mut self) -> Result<SerializedEntry, TensorReadError> {
        Ok(self.state.compute_final(self.format()))
    }

    fn clear(&mut self) {
        self.sampler.clear();
        self.state.reset();
    }

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: Some(S::UNIT.to_string()),
            higher_is_better: S::HIGHER_IS_BETTER,
        }
        .into()
    }
}

impl<S: Sampler> Numeric for Gauge<S> {
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

/// The token positions of a batch (`batch × sequence`, padding included, as trainers count).
pub struct TokenCount(pub usize);

impl Adaptor<TokenCount> for SequenceOutput {
    fn adapt(&self) -> TokenCount {
        TokenCount(self.targets.shape().num_elements())
    }
}

/// Tokens a second since the epoch's first batch: throughput that does not depend on the
/// batch size, so runs of different shapes compare.
#[derive(Clone, Default)]
pub struct TokenRate {
    /// When the first batch of the epoch was seen, and the tokens since.
    start: Option<(Instant, usize)>,
}

impl Sampler for TokenRate {
    type Input = TokenCount;
    const NAME: &str = "Tokens per Second";
    const UNIT: &str = "tokens/s";
    const PRECISION: usize = 0;
    const HIGHER_IS_BETTER: bool = true;

    fn sample(&mut self, tokens: &TokenCount) -> f64 {
        // The clock starts at the first batch, whose own time is unknown: it is not counted.
        match &mut self.start {
            Some((start, total)) => {
                *total += tokens.0;
                *total as f64 / start.elapsed().as_secs_f64()
            }
            None => {
                self.start = Some((Instant::now(), 0));
                0.0
            }
        }
    }

    fn clear(&mut self) {
        self.start = None;
    }
}

/// GiB the device's allocator has reserved (live tensors, and pages kept for reuse), with the
/// most it has reserved in the run as a note.
#[derive(Clone)]
pub struct PoolMemory {
    device: Device,
    peak_gib: f64,
}

impl PoolMemory {
    /// The sampler of `device`, or `None` when its backend does not report its memory (Flex).
    pub fn new(device: &Device) -> Option<Self> {
        device.memory_pool_usage()?;
        Some(Self {
            device: device.clone(),
            peak_gib: 0.0,
        })
    }
}

impl Sampler for PoolMemory {
    type Input = ();
    const NAME: &str = "Device Memory";
    const UNIT: &str = "GiB";
    const PRECISION: usize = 2;
    const HIGHER_IS_BETTER: bool = false;

    fn sample(&mut self, _: &()) -> f64 {
        let reserved = self.device.memory_pool_usage().map_or(0.0, |usage| {
            usage.bytes_reserved as f64 / (1u64 << 30) as f64
        });
        self.peak_gib = self.peak_gib.max(reserved);
        reserved
    }

    fn note(&self) -> Option<String> {
        Some(format!("peak {:.2} GiB", self.peak_gib))
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
        let sampler = PoolMemory::new(&device).expect("wgpu reports its memory");
        let mut metric = Gauge::new(sampler);
        let read = |metric: &mut Gauge<PoolMemory>| {
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
        assert!(metric.sampler.peak_gib >= with_tensor);
        drop(tensor);
    }
}
