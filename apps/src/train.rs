//! The training job: a LLaMA model with LoRA adapters over 4-bit bases, trained on a chat or
//! text dataset through burn-train's `Learner`. An "epoch" of the Learner is
//! `train.checkpoint_every` optimizer steps, so its per-epoch validation and checkpoints come
//! every N steps; the data position is the epoch number (the batch order is a function of the
//! seed), so a resumed run continues on the batches it would have seen.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};
use burn::data::dataloader::{DataLoader, DataLoaderIterator, Progress};
use burn::data::dataset::DatasetError;
use burn::module::{
    Devices, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper, ModuleVisitor, ParamGroup,
};
use burn::optim::lr_scheduler::LrSchedulerConfig;
use burn::optim::lr_scheduler::LrSchedulerRecord;
use burn::optim::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
use burn::optim::lr_scheduler::linear::LinearLrSchedulerConfig;
use burn::optim::lr_scheduler::module_lr_scheduler::{ModuleLearningRate, ModuleLrScheduler};
use burn::optim::lr_scheduler::sequential::SequentialLrSchedulerConfig;
use burn::optim::{GradientsParams, ModuleOptimizer, OptimizerRecord};
use burn::store::ModuleRecord;
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn::train::checkpoint::{Checkpoint, Checkpointer, CheckpointerError, KeepLastNCheckpoints};
use burn::train::metric::{CpuMemory, IterationSpeedMetric, LearningRateMetric, LossMetric};
use burn::train::{InferenceStep, Learner, SupervisedTraining, TrainOutput, TrainStep};
use burn_qlora::{FusedAdamWConfig, PeftAdapter};
use kernels_cubecl::cross_entropy;
use llama_burn::Llama;

use crate::config::TrainConfig;
use crate::data::{self, Encoder, Example};
use crate::grad_norm::clip_grad_norm;
use crate::metrics::{Gauge, LmOutput, Perplexity, PoolMemory, TokenRate};
use crate::progress::PlainRenderer;
use crate::trained;

/// The folder of the run's checkpoints, inside its output folder.
pub const CHECKPOINT_DIR: &str = "checkpoint";
/// The final adapter, in PEFT's layout, inside the output folder.
pub const ADAPTER_DIR: &str = "adapter";
const RECORDS: [&str; 3] = ["model", "optim", "scheduler"];

/// A micro-batch: inputs, next-token targets, and which targets count in the loss.
#[derive(Clone, Debug)]
pub struct LmBatch {
    pub inputs: Tensor<2, Int>,
    pub targets: Tensor<2, Int>,
    /// 1 where the target is trained, 0 on prompt and padding.
    pub weights: Tensor<2>,
}

impl LmBatch {
    /// Pads `examples` to the longest with `pad_id` (never trained) and shifts them by one.
    pub fn new(examples: &[&Example], pad_id: u32, device: &Device) -> Self {
        let len = examples.iter().map(|e| e.len()).max().unwrap_or(2).max(2) - 1;
        let mut inputs = Vec::with_capacity(examples.len() * len);
        let mut targets = Vec::with_capacity(examples.len() * len);
        let mut weights = Vec::with_capacity(examples.len() * len);
        for example in examples {
            for position in 0..len {
                let id = |at: usize| example.ids.get(at).copied().unwrap_or(pad_id);
                inputs.push(id(position) as i64);
                targets.push(id(position + 1) as i64);
                let trained = example.trained.get(position + 1).copied().unwrap_or(false);
                weights.push(if trained { 1.0f32 } else { 0.0 });
            }
        }
        let shape = [examples.len(), len];
        Self {
            inputs: Tensor::from_data(TensorData::new(inputs, shape), device),
            targets: Tensor::from_data(TensorData::new(targets, shape), device),
            weights: Tensor::from_data(TensorData::new(weights, shape), device),
        }
    }

    /// Trained targets, at least 1: what the loss is the mean over.
    fn trained_count(&self) -> Tensor<1> {
        self.weights.clone().sum().clamp_min(1.0)
    }
}

/// `Σ -log p(target) · weight / count` over the positions of `logits`, in f32, through the
/// fused cross-entropy kernels (no f32 copy of the logits, one cube per position).
fn weighted_nll(
    logits: Tensor<3>,
    targets: Tensor<2, Int>,
    weights: Tensor<2>,
    count: Tensor<1>,
) -> Tensor<1> {
    (cross_entropy(logits, targets) * weights).sum() / count
}

/// The model being trained: a [`Llama`] whose checkpoint record is its trainable parameters
/// only (the adapters, and biases where `lora.bias` trains them), so checkpoints stay the size
/// of the adapters; the frozen base comes from the model file again on resume.
#[derive(Clone, Debug)]
pub struct CausalLm {
    pub model: Llama,
    trainable: ParamGroup,
    /// 1 / gradient-accumulation steps: accumulated gradients are summed.
    loss_scale: f64,
    /// Global gradient-norm limit for each optimizer step; 0 for none.
    max_grad_norm: f64,
    /// Activation checkpointing per decoder layer, the head and loss a chunk at a time.
    checkpoint_layers: bool,
    /// Without checkpointing: the 4-bit weights dequantized once a step, the dense copies kept
    /// from each layer's forward to its backward.
    dense_weights: bool,
}

/// Rows (sequences x positions) of the chunks the checkpointed step computes the head and loss
/// in, as torchtune's chunked cross-entropy: the logits of one chunk exist at a time (64 MiB of
/// bf16 at a 32000 vocabulary). 1024 rows keep the head's input-gradient product, 1024 x 4096
/// deep in the vocabulary, at 128 of the `wgmma` kernel's tiles: a chunk of 256 rows gave 32
/// tiles to 132 multiprocessors and took 4x as long a row.
const OUTPUT_CHUNK_ROWS: usize = 1024;

impl CausalLm {
    pub fn new(model: Llama, trainable: ParamGroup, grad_accum: usize) -> Self {
        Self {
            model,
            trainable,
            loss_scale: 1.0 / grad_accum as f64,
            max_grad_norm: 0.0,
            checkpoint_layers: false,
            dense_weights: false,
        }
    }

    /// Trains with activation checkpointing per decoder layer
    /// ([`Llama::checkpointed_backward`]): the same gradients for a second forward's time, with
    /// one layer's activations alive at a time.
    pub fn with_activation_checkpointing(self, checkpoint_layers: bool) -> Self {
        Self {
            checkpoint_layers,
            ..self
        }
    }

    /// Keeps each layer's dequantized weights from its forward to its backward where the step
    /// is not checkpointed ([`Llama::forward_over_dense_copies`]): no dequantization in the
    /// backward, for 2 bytes a frozen weight of memory. Checkpointed steps do this a layer at a
    /// time already.
    pub fn with_dense_weights(self, dense_weights: bool) -> Self {
        Self {
            dense_weights,
            ..self
        }
    }

    /// Clips the (accumulated) gradients of each optimizer step to this global norm.
    pub fn with_max_grad_norm(self, max_grad_norm: f64) -> Self {
        Self {
            max_grad_norm,
            ..self
        }
    }

    /// Mean next-token cross-entropy over the trained targets.
    pub fn loss(&self, batch: &LmBatch) -> Tensor<1> {
        self.loss_over(batch, batch.trained_count(), false)
    }

    /// [`Self::loss`] given the batch's trained-target count, which the step also reports; over
    /// the weights' dense copies where a backward follows (`training`) and they are asked for.
    fn loss_over(&self, batch: &LmBatch, count: Tensor<1>, training: bool) -> Tensor<1> {
        let inputs = batch.inputs.clone();
        let logits = if training && self.dense_weights {
            // The copies fail only where the 4-bit forward itself would.
            self.model
                .forward_over_dense_copies(inputs)
                .unwrap_or_else(|err| panic!("the base weights' dense copies: {err}"))
        } else {
            self.model.forward(inputs, None)
        };
        weighted_nll(logits, batch.targets.clone(), batch.weights.clone(), count)
    }

    /// What the metrics read of a step: its loss, the count of trained targets it is the mean
    /// over (`batch.trained_count()`), and the batch's positions.
    fn output(batch: &LmBatch, loss: Tensor<1>, trained: Tensor<1>) -> LmOutput {
        LmOutput {
            loss,
            trained,
            positions: batch.targets.shape().num_elements(),
        }
    }
}

impl TrainStep for CausalLm {
    type Input = LmBatch;
    type Output = LmOutput;

    fn step(&self, batch: LmBatch) -> TrainOutput<LmOutput> {
        if self.checkpoint_layers {
            let count = batch.trained_count();
            let chunk_positions = OUTPUT_CHUNK_ROWS.div_ceil(batch.targets.dims()[0]);
            let step = self.model.checkpointed_backward(
                batch.inputs.clone(),
                chunk_positions,
                self.loss_scale,
                |logits, positions| {
                    let (start, len) = (positions.start, positions.len());
                    weighted_nll(
                        logits,
                        batch.targets.clone().narrow(1, start, len),
                        batch.weights.clone().narrow(1, start, len),
                        count.clone(),
                    )
                },
            );
            return TrainOutput {
                grads: step.grads,
                item: Self::output(&batch, step.loss, count),
            };
        }
        let count = batch.trained_count();
        let loss = self.loss_over(&batch, count.clone(), true);
        let grads = (loss.clone() * self.loss_scale).backward();
        TrainOutput::new(self, grads, Self::output(&batch, loss, count))
    }

    // The gradients here are the accumulated ones of a whole optimizer step.
    fn optimize(
        self,
        optim: &mut ModuleOptimizer,
        lr: ModuleLearningRate,
        mut grads: GradientsParams,
    ) -> Self {
        if self.max_grad_norm > 0.0 {
            clip_grad_norm(&self, &mut grads, self.max_grad_norm);
        }
        optim.step(lr, self, grads)
    }
}

impl InferenceStep for CausalLm {
    type Input = LmBatch;
    type Output = LmOutput;

    fn step(&self, batch: LmBatch) -> LmOutput {
        let count = batch.trained_count();
        let loss = self.loss_over(&batch, count.clone(), false);
        Self::output(&batch, loss, count)
    }
}

// By hand rather than derived, for `into_record`: the record of the trainable group only.
impl Module for CausalLm {
    fn collect_devices(&self, devices: Devices) -> Devices {
        self.model.collect_devices(devices)
    }

    fn fork(self, device: &Device) -> Self {
        Self {
            model: self.model.fork(device),
            ..self
        }
    }

    fn to_device(self, device: &Device) -> Self {
        Self {
            model: self.model.to_device(device),
            ..self
        }
    }

    fn train(self) -> Self {
        Self {
            model: self.model.train(),
            ..self
        }
    }

    fn valid(&self) -> Self {
        Self {
            model: self.model.valid(),
            ..self.clone()
        }
    }

    fn materialize(self) -> Self {
        Self {
            model: self.model.materialize(),
            ..self
        }
    }

    fn visit<V: ModuleVisitor>(&self, visitor: &mut V) {
        self.model.visit(visitor);
    }

    fn map<M: ModuleMapper>(self, mapper: &mut M) -> Self {
        Self {
            model: self.model.map(mapper),
            ..self
        }
    }

    fn into_record(self) -> ModuleRecord {
        self.model.into_record_group(self.trainable)
    }

    fn try_load_record(self, record: ModuleRecord) -> Result<Self, burn::store::RecordError> {
        Ok(Self {
            model: self.model.try_load_record(record.allow_partial(true))?,
            ..self
        })
    }

    fn load_record(self, record: ModuleRecord) -> Self {
        self.try_load_record(record)
            .expect("checkpoint checked before training")
    }
}

impl ModuleDisplayDefault for CausalLm {
    fn content(&self, content: burn::module::Content) -> Option<burn::module::Content> {
        self.model.content(content)
    }
}

impl ModuleDisplay for CausalLm {}

impl std::fmt::Display for CausalLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LLaMA with LoRA adapters, {} parameters outside the 4-bit weights",
            Module::num_params(self)
        )
    }
}

/// Saves each record with a write to a temporary file and a rename, so a checkpoint is whole
/// or absent, never half written.
pub struct AtomicCheckpointer {
    dir: PathBuf,
    name: &'static str,
}

impl AtomicCheckpointer {
    fn path(&self, epoch: usize) -> PathBuf {
        record_path(&self.dir, self.name, epoch)
    }
}

/// The file of record `name` (model, optim, scheduler) of checkpoint `epoch`.
pub fn record_path(dir: &Path, name: &str, epoch: usize) -> PathBuf {
    dir.join(format!("{name}-{epoch}.bpk"))
}

impl<R: Checkpoint> Checkpointer<R> for AtomicCheckpointer {
    fn save(&self, epoch: usize, record: R) -> Result<(), CheckpointerError> {
        burn_qlora::write_atomically_with(&self.path(epoch), |temporary| {
            record
                .save(temporary.to_path_buf())
                .map_err(std::io::Error::other)
        })
        .map_err(CheckpointerError::IOError)
    }

    fn delete(&self, epoch: usize) -> Result<(), CheckpointerError> {
        match std::fs::remove_file(self.path(epoch)) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                Err(CheckpointerError::IOError(err))
            }
            _ => Ok(()),
        }
    }

    fn restore(&self, epoch: usize) -> Result<R, CheckpointerError> {
        R::load(self.path(epoch))
    }
}

/// The newest epoch whose model, optimizer and scheduler records are all in `dir`.
pub fn latest_checkpoint(dir: &Path) -> Option<usize> {
    let entries = std::fs::read_dir(dir).ok()?;
    entries
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            let epoch = name.strip_prefix("model-")?.strip_suffix(".bpk")?;
            epoch.parse::<usize>().ok()
        })
        .filter(|&epoch| {
            RECORDS
                .iter()
                .all(|name| record_path(dir, name, epoch).is_file())
        })
        .max()
}

/// Batches for the Learner. Training: an endless stream (a new length-grouped order every pass
/// over the data, seeded by the pass) cut into epochs of `per_epoch` batches; each `iter()` is
/// the next epoch. Validation: every batch, each time.
#[derive(Clone)]
struct StepLoader {
    examples: Arc<Vec<Example>>,
    batch_size: usize,
    seed: u64,
    /// Batches per epoch; `None` for one pass over the data (validation).
    per_epoch: Option<usize>,
    next_epoch: Arc<AtomicUsize>,
    pad_id: u32,
    device: Device,
}

impl StepLoader {
    fn batches_of_epoch(&self, epoch: usize) -> Vec<Vec<usize>> {
        let Some(per_epoch) = self.per_epoch else {
            return data::length_grouped_batches(&self.examples, self.batch_size, self.seed);
        };
        // Every pass over the data has its own order, seeded by the pass number.
        let per_pass = self.examples.len().div_ceil(self.batch_size);
        let mut order = (usize::MAX, Vec::new());
        let mut batches = Vec::new();
        for global in epoch * per_epoch..(epoch + 1) * per_epoch {
            let pass = global / per_pass;
            if order.0 != pass {
                let seed = self.seed.wrapping_add(pass as u64);
                order = (
                    pass,
                    data::length_grouped_batches(&self.examples, self.batch_size, seed),
                );
            }
            batches.push(order.1[global % per_pass].clone());
        }
        batches
    }
}

struct StepIterator<'a> {
    loader: &'a StepLoader,
    batches: std::vec::IntoIter<Vec<usize>>,
    processed: usize,
    total: usize,
}

impl Iterator for StepIterator<'_> {
    type Item = Result<LmBatch, DatasetError>;

    fn next(&mut self) -> Option<Self::Item> {
        let batch = self.batches.next()?;
        self.processed += 1;
        let examples: Vec<&Example> = batch.iter().map(|&i| &self.loader.examples[i]).collect();
        Some(Ok(LmBatch::new(
            &examples,
            self.loader.pad_id,
            &self.loader.device,
        )))
    }
}

impl DataLoaderIterator<LmBatch> for StepIterator<'_> {
    fn progress(&self) -> Progress {
        Progress {
            items_processed: self.processed,
            items_total: self.total,
            unit: Some("batches".into()),
        }
    }
}

impl DataLoader<LmBatch> for StepLoader {
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<LmBatch> + 'a> {
        let epoch = match self.per_epoch {
            Some(_) => self.next_epoch.fetch_add(1, Ordering::SeqCst),
            None => 0,
        };
        let batches = self.batches_of_epoch(epoch);
        Box::new(StepIterator {
            loader: self,
            total: batches.len(),
            batches: batches.into_iter(),
            processed: 0,
        })
    }

    fn num_items(&self) -> usize {
        match self.per_epoch {
            Some(per_epoch) => per_epoch,
            None => self.examples.len().div_ceil(self.batch_size),
        }
    }

    fn to_device(&self, device: &Device) -> Arc<dyn DataLoader<LmBatch>> {
        Arc::new(Self {
            device: device.clone(),
            ..self.clone()
        })
    }

    fn slice(&self, _start: usize, _end: usize) -> Arc<dyn DataLoader<LmBatch>> {
        Arc::new(self.clone())
    }
}

/// What a finished run reports.
#[derive(Debug)]
pub struct RunSummary {
    pub output_dir: PathBuf,
    pub adapter_dir: PathBuf,
    pub train_examples: usize,
    pub valid_examples: usize,
}

/// Trains as `config` says; with `resume`, from the newest checkpoint in its output folder.
pub fn run(config: &TrainConfig, resume: bool) -> Result<RunSummary> {
    let output_dir = config.output_dir();
    let checkpoint_dir = output_dir.join(CHECKPOINT_DIR);
    let resume_from = if resume {
        let epoch = latest_checkpoint(&checkpoint_dir).with_context(|| {
            format!(
                "--resume: no complete checkpoint in {}",
                checkpoint_dir.display()
            )
        })?;
        Some(epoch)
    } else {
        if latest_checkpoint(&checkpoint_dir).is_some() {
            bail!(
                "{} already holds checkpoints: pass --resume to continue that run, or choose \
                 another train.output_dir",
                output_dir.display()
            );
        }
        None
    };
    std::fs::create_dir_all(&checkpoint_dir)
        .with_context(|| format!("creating {}", checkpoint_dir.display()))?;
    config.save_to_run(&output_dir)?;

    let device = crate::device(&config.train.backend)?;
    device.seed(config.train.seed);
    let qlora = config.qlora_config()?;
    // Loaded on the autodiff device, so the adapters are tracked parameters from the start.
    let train_device = device.clone().autodiff();
    let loaded = trained::load_base(config, qlora.clone(), &train_device)?;
    let tokenizer = trained::tokenizer(config, &loaded)?;
    let model_path = loaded.model_path.clone();
    let model = loaded.model;
    let template = crate::chat_template(&config.model.template, &model_path)?;

    let data_path = crate::data_path(&config.data.path)?;
    eprintln!("reading {}", data_path.display());
    let mut records = data::read_records(&data_path, &config.data.format)?;
    if config.data.max_examples > 0 {
        records.truncate(config.data.max_examples);
    }
    let encoder = Encoder {
        tokenizer: &tokenizer,
        template: &template,
        max_seq_len: config.data.max_seq_len,
        train_on_prompt: config.data.train_on_prompt,
    };
    let examples = records
        .iter()
        .map(|record| encoder.encode(record))
        .collect::<Result<Vec<_>, _>>()?;
    let examples: Vec<Example> = examples
        .into_iter()
        .filter(|example| example.trained.iter().skip(1).any(|&t| t))
        .collect();
    if examples.is_empty() {
        bail!("{}: no example has a trained token", data_path.display());
    }
    let split = data::split(examples, config.data.valid_fraction, config.train.seed);
    let (train_examples, valid_examples) = (split.train.len(), split.valid.len());
    eprintln!("{train_examples} training and {valid_examples} validation examples");

    let train = &config.train;
    let steps_per_epoch = train.checkpoint_every.min(train.steps);
    let epochs = train.steps.div_ceil(steps_per_epoch);
    let pad_id = tokenizer.pad_id();
    let train_loader = StepLoader {
        examples: Arc::new(split.train),
        batch_size: train.batch_size,
        seed: train.seed,
        per_epoch: Some(steps_per_epoch * train.grad_accum),
        next_epoch: Arc::new(AtomicUsize::new(resume_from.unwrap_or(0))),
        pad_id,
        device: device.clone(),
    };
    let valid_loader = StepLoader {
        examples: Arc::new(split.valid),
        per_epoch: None,
        ..train_loader.clone()
    };

    let trainable = burn_qlora::trainable_params(&model, qlora.lora.bias);
    let model = CausalLm::new(model, trainable, train.grad_accum);
    if let Some(epoch) = resume_from {
        check_checkpoint(&model, &checkpoint_dir, epoch)?;
        eprintln!("resuming from checkpoint {epoch} of {epochs}");
    }
    let model = model
        .with_max_grad_norm(train.max_grad_norm)
        .with_activation_checkpointing(train.activation_checkpointing)
        .with_dense_weights(train.dense_weights);
    let optimizer = FusedAdamWConfig::new().with_weight_decay(train.weight_decay as f32);
    let learner = Learner::new(model, optimizer.init(), lr_scheduler(config)?);

    let checkpointer = |name| AtomicCheckpointer {
        dir: checkpoint_dir.clone(),
        name,
    };
    let mut training =
        SupervisedTraining::new(&output_dir, Arc::new(train_loader), Arc::new(valid_loader))
            .metric_train_numeric(LossMetric::new())
            .metric_valid_numeric(LossMetric::new())
            .metric_train_numeric(Perplexity::default())
            .metric_valid_numeric(Perplexity::default())
            .metric_train_numeric(LearningRateMetric::new())
            .metric_train_numeric(Gauge::new(TokenRate::default()))
            .metric_train_numeric(IterationSpeedMetric::new())
            .metric_train(CpuMemory::new())
            .with_custom_checkpointers(
                checkpointer("model"),
                checkpointer("optim"),
                checkpointer("scheduler"),
            )
            .with_checkpointing_strategy(KeepLastNCheckpoints::new(train.keep_checkpoints))
            .num_epochs(epochs)
            .summary();
    if let Some(memory) = PoolMemory::new(&device) {
        training = training.metric_train_numeric(Gauge::new(memory));
    }
    // The dashboard in a terminal (Burn's default there); elsewhere a line a step.
    if !std::io::stdout().is_terminal() {
        training = training.renderer(Box::new(PlainRenderer::stdout()));
    }
    if train.grad_accum > 1 {
        training = training.grads_accumulation(train.grad_accum);
    }
    if let Some(epoch) = resume_from {
        training = training.checkpoint(epoch);
    }
    let result = training.launch(learner);
    if let Some(error) = result.error {
        bail!("training stopped: {error}");
    }

    let adapter_dir = output_dir.join(ADAPTER_DIR);
    let peft = trained::peft_config(config, &model_path)?;
    PeftAdapter::from_model(&result.model.model, peft)
        .save(&adapter_dir)
        .with_context(|| format!("saving the adapter to {}", adapter_dir.display()))?;
    Ok(RunSummary {
        output_dir,
        adapter_dir,
        train_examples,
        valid_examples,
    })
}

/// Reads the three records of checkpoint `epoch` and applies the model's, so a truncated or
/// foreign checkpoint is an error naming its file before training starts, not a panic inside it.
fn check_checkpoint(model: &CausalLm, dir: &Path, epoch: usize) -> Result<()> {
    let path = |name| record_path(dir, name, epoch);
    trained::load_checkpoint(model.model.clone(), &path("model"))?;
    OptimizerRecord::load(path("optim"))
        .map_err(|err| anyhow::anyhow!("checkpoint {}: {err}", path("optim").display()))?;
    LrSchedulerRecord::load(path("scheduler"))
        .map_err(|err| anyhow::anyhow!("checkpoint {}: {err}", path("scheduler").display()))?;
    Ok(())
}

/// Linear warmup from lr / (warmup + 1) to lr, then cosine to zero or constant.
fn lr_scheduler(config: &TrainConfig) -> Result<ModuleLrScheduler> {
    let train = &config.train;
    let after_warmup = train.steps.saturating_sub(train.warmup_steps).max(1);
    let main = match train.schedule.as_str() {
        "cosine" => LrSchedulerConfig::Cosine(CosineAnnealingLrSchedulerConfig::new(
            train.lr,
            after_warmup,
        )),
        _ => LrSchedulerConfig::Constant(train.lr),
    };
    let scheduler = if train.warmup_steps == 0 {
        SequentialLrSchedulerConfig::new(vec![main], vec![])
    } else {
        let start = train.lr / (train.warmup_steps + 1) as f64;
        let warmup = LinearLrSchedulerConfig::new(start, train.lr, train.warmup_steps);
        SequentialLrSchedulerConfig::new(
            vec![LrSchedulerConfig::Linear(warmup), main],
            vec![train.warmup_steps],
        )
    };
    scheduler
        .init()
        .map_err(|err| anyhow::anyhow!("config [train] learning-rate schedule: {err}"))
}
