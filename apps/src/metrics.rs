//! What a language-model step gives the metrics ([`LmOutput`]), and the metrics Burn does not
//! have: perplexity from the step's loss, tokens per second, and the device memory Burn's
//! allocator holds (the number a GPU run's batch size is chosen by). The last two are a
//! [`Gauge`]: a number sampled at every step, averaged like Burn's numeric metrics.

use std::sync::Arc;
use std::time::Instant;

use burn::tensor::{Device, ExecutionError, Tensor, TensorReadError};
use burn::train::ItemLazy;
use burn::train::metric::state::{FormatOptions, NumericMetricState};
use burn::train::metric::{
    Adaptor, LossInput, Metric, MetricAttributes, MetricMetadata, MetricName, Numeric,
    NumericAttributes, NumericEntry, SerializedEntry, format_float,
};

/// What a training or validation step of a language model gives the metrics: its loss and the
/// size of its batch, without the logits. Burn's `SequenceOutput` carries `[batch, seq, vocab]`
/// logits for its perplexity metric, which a checkpointed step would have to keep whole through
/// the layers' backward (131 MB at LLaMA-2-7B's vocabulary and 2048 positions, twice that while
/// its chunks are joined) and which that metric reads through a second log-softmax.
pub struct LmOutput {
    /// The mean next-token cross-entropy over the trained targets.
    pub loss: Tensor<1>,
    /// How many targets were trained (prompt and padding are not).
    pub trained: Tensor<1>,
    /// Token positions of the batch, padding included.
    pub positions: usize,
}

impl ItemLazy for LmOutput {
    // As Burn's own outputs: flush the step's work, and leave the graph behind.
    fn sync(self) -> Result<Self, ExecutionError> {
        self.loss.device().flush()?;
        Ok(Self {
            loss: self.loss.without_autodiff(),
            trained: self.trained.without_autodiff(),
            positions: self.positions,
        })
    }
}

impl Adaptor<LossInput> for LmOutput {
    fn adapt(&self) -> LossInput {
        LossInput::new(self.loss.clone())
    }
}

/// A step's mean next-token cross-entropy and the count of targets it is the mean of.
pub struct NllInput {
    mean: Tensor<1>,
    count: Tensor<1>,
}

impl Adaptor<NllInput> for LmOutput {
    fn adapt(&self) -> NllInput {
        NllInput {
            mean: self.loss.clone(),
            count: self.trained.clone(),
        }
    }
}

/// `exp` of the mean next-token cross-entropy over the trained targets: the batch's, and the
/// epoch's over all its targets (as Burn's `PerplexityMetric`, from the step's f32 loss).
#[derive(Clone)]
pub struct Perplexity {
    name: MetricName,
    /// The epoch's summed cross-entropy and its targets.
    sum_nll: f64,
    targets: f64,
    /// The last batch's perplexity and targets.
    current: f64,
    current_targets: f64,
}

impl Default for Perplexity {
    fn default() -> Self {
        Self {
            name: Arc::new("Perplexity".to_string()),
            sum_nll: 0.0,
            targets: 0.0,
            current: f64::NAN,
            current_targets: 0.0,
        }
    }
}

impl Perplexity {
    fn epoch(&self) -> f64 {
        match self.targets > 0.0 {
            true => (self.sum_nll / self.targets).exp(),
            false => f64::INFINITY,
        }
    }

    fn entry(value: f64, targets: f64) -> NumericEntry {
        NumericEntry::Aggregated {
            aggregated_value: value,
            count: targets as usize,
        }
    }

    fn format(&self) -> String {
        format!(
            "epoch {} - batch {}",
            format_float(self.epoch(), 2),
            format_float(self.current, 2)
        )
    }
}

impl Metric for Perplexity {
    type Input = NllInput;

    fn update(
        &mut self,
        input: &NllInput,
        _metadata: &MetricMetadata,
    ) -> Result<SerializedEntry, TensorReadError> {
        let mean = input.mean.clone().try_into_scalar::<f64>()?;
        let count = input.count.clone().try_into_scalar::<f64>()?;
        self.sum_nll += mean * count;
        self.targets += count;
        self.current = mean.exp();
        self.current_targets = count;
        let entry = Self::entry(self.current, count);
        Ok(SerializedEntry::new(self.format(), entry.serialize()))
    }

    fn compute(&mut self) -> Result<SerializedEntry, TensorReadError> {
        let entry = NumericEntry::Final(self.epoch());
        Ok(SerializedEntry::new(self.format(), entry.serialize()))
    }

    fn clear(&mut self) {
        *self = Self::default();
    }

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: None,
            higher_is_better: false,
        }
        .into()
    }
}

impl Numeric for Perplexity {
    fn value(&self) -> Option<NumericEntry> {
        Some(Self::entry(self.current, self.current_targets))
    }

    fn running_value(&self) -> Option<NumericEntry> {
        Some(Self::entry(self.epoch(), self.targets))
    }

    fn final_value(&self) -> NumericEntry {
        NumericEntry::Final(self.epoch())
    }
}

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

impl Adaptor<TokenCount> for LmOutput {
    fn adapt(&self) -> TokenCount {
        TokenCount(self.positions)
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

#[cfg(test)]
mod tests {
    use burn::tensor::activation::log_softmax;
    use burn::tensor::{Distribution, Int, Tensor};
    use burn::train::metric::{PerplexityInput, PerplexityMetric};

    use super::*;

    fn metadata() -> MetricMetadata {
        MetricMetadata {
            progress: burn::data::dataloader::Progress {
                items_processed: 1,
                items_total: 1,
                unit: None,
            },
            iteration: Some(1),
            lr: None,
        }
    }

    /// Over two batches of different sizes, perplexity from the mean losses equals Burn's
    /// `PerplexityMetric` on the logits themselves, batch and epoch, in f32 (relative 1e-5).
    #[test]
    fn perplexity_from_the_loss_equals_burns_from_the_logits() {
        let device = crate::device("flex").unwrap();
        let mut ours = Perplexity::default();
        let mut burns = PerplexityMetric::new();
        for tokens in [6, 10] {
            let logits = Tensor::<2>::random([tokens, 50], Distribution::Normal(0.0, 3.0), &device);
            let targets =
                Tensor::<1, Int>::random([tokens], Distribution::Uniform(0.0, 50.0), &device);
            let nll = -log_softmax(logits.clone(), 1)
                .gather(1, targets.clone().unsqueeze_dim(1))
                .mean();
            let input = NllInput {
                mean: nll,
                count: Tensor::from_floats([tokens as f32], &device),
            };
            ours.update(&input, &metadata()).unwrap();
            burns
                .update(&PerplexityInput::new(logits, targets), &metadata())
                .unwrap();
            let close = |a: f64, b: f64| ((a - b) / b).abs() < 1e-5;
            let (batch, expected) = (ours.value(), burns.value());
            assert!(
                close(batch.unwrap().current(), expected.unwrap().current()),
                "{tokens} tokens: batch perplexity"
            );
            let (epoch, expected) = (ours.running_value(), burns.running_value());
            assert!(
                close(epoch.unwrap().current(), expected.unwrap().current()),
                "{tokens} tokens: epoch perplexity"
            );
        }
    }

    /// On a CubeCL device the metric reads the allocator: a 64 MiB tensor shows, and stays in
    /// the peak after it is dropped.
    #[cfg(feature = "wgpu")]
    #[test]
    fn device_memory_follows_the_allocator() {
        let device = crate::device("wgpu").unwrap();
        let sampler = PoolMemory::new(&device).expect("wgpu reports its memory");
        let mut metric = Gauge::new(sampler);
        let read = |metric: &mut Gauge<PoolMemory>| {
            metric.update(&(), &metadata()).unwrap();
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
