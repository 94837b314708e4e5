//! The training job on the golden tiny LLaMA (`../shared/golden/llama_tiny`) with a word-level
//! tokenizer made here: the loss goes down, only response tokens count, a resumed run equals an
//! uninterrupted one, and a damaged checkpoint is refused without touching the run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use apps::config::TrainConfig;
use apps::data::{Encoder, Record, read_records};
use apps::train::{CausalLm, LmBatch};
use burn::tensor::Device;
use burn_qlora::PeftAdapter;
use integration_tests::golden_dir;
use llama_burn::{ChatTemplate, Llama, LoadOptions, Message, Role, Tokenizer};

/// Runs draw the adapters' initial values from the device's seeded generator, which every test
/// thread shares: the tests that train take turns so each run's draws are its own.
static DEVICE_RNG: Mutex<()> = Mutex::new(());

fn take_turn() -> MutexGuard<'static, ()> {
    DEVICE_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

const QUESTIONS: [(&str, &str); 8] = [
    ("what is one plus one", "two"),
    ("what is two plus one", "three"),
    ("what is two plus two", "four"),
    ("what is three plus two", "five"),
    ("name a red fruit", "apple"),
    ("name a yellow fruit", "banana"),
    ("name a green vegetable", "pea"),
    ("name an orange vegetable", "carrot"),
];

/// A scratch folder with the data, and a word-level `tokenizer.json` for the tiny model's
/// 512-token vocabulary (ids 0-2: unk, BOS, EOS).
struct Workspace {
    dir: PathBuf,
}

impl Workspace {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("train-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut words: Vec<String> = ["<unk>", "<s>", "</s>", "###", "HUMAN", "RESPONSE", ":"]
            .map(String::from)
            .to_vec();
        for (question, answer) in QUESTIONS {
            for word in question.split(' ').chain([answer]) {
                if !words.iter().any(|w| w == word) {
                    words.push(word.to_string());
                }
            }
        }
        let vocab: BTreeMap<&str, usize> = words
            .iter()
            .enumerate()
            .map(|(id, w)| (w.as_str(), id))
            .collect();
        let tokenizer = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        });
        std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
        let lines: Vec<String> = QUESTIONS
            .iter()
            .map(|(q, a)| {
                serde_json::json!({"instruction": q, "input": "", "output": a}).to_string()
            })
            .collect();
        std::fs::write(dir.join("data.jsonl"), lines.join("\n")).unwrap();
        Self { dir }
    }

    fn config(&self, golden: &Path, run: &str, overrides: &[&str]) -> TrainConfig {
        let mut all = vec![
            format!(
                "model.path={:?}",
                golden.join("llama_tiny").display().to_string()
            ),
            format!(
                "model.tokenizer={:?}",
                self.dir.join("tokenizer.json").display().to_string()
            ),
            "model.template=human_response".into(),
            format!(
                "data.path={:?}",
                self.dir.join("data.jsonl").display().to_string()
            ),
            "data.valid_fraction=0.25".into(),
            format!(
                "train.output_dir={:?}",
                self.dir.join(run).display().to_string()
            ),
            "train.backend=flex".into(),
            "train.batch_size=2".into(),
            "train.lr=0.01".into(),
            "train.warmup_steps=0".into(),
            "train.schedule=constant".into(),
            "lora.dropout=0.0".into(),
            "quant.block_size=32".into(),
        ];
        all.extend(overrides.iter().map(|o| o.to_string()));
        TrainConfig::load(None, &all).unwrap()
    }

    fn tokenizer(&self) -> Tokenizer {
        Tokenizer::from_file(&self.dir.join("tokenizer.json"), Some(1), Some(2)).unwrap()
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The run's model as training built it (4-bit bases), with the adapter of `adapter_dir`.
fn trained_model(config: &TrainConfig, adapter_dir: Option<&Path>) -> Llama {
    let device = Device::flex();
    let options = LoadOptions {
        qlora: Some(config.qlora_config().unwrap()),
        ..LoadOptions::default()
    };
    let (model, _) = Llama::load(Path::new(&config.model.path), &options, &device).unwrap();
    match adapter_dir {
        Some(dir) => PeftAdapter::load(dir, &device)
            .unwrap()
            .load_into(model)
            .unwrap(),
        None => model,
    }
}

/// Mean loss of `model` over the data's trained tokens, all examples in one batch.
fn mean_loss(ws: &Workspace, config: &TrainConfig, model: Llama) -> f32 {
    let tokenizer = ws.tokenizer();
    let template = ChatTemplate::HumanResponse;
    let encoder = Encoder {
        tokenizer: &tokenizer,
        template: &template,
        max_seq_len: 64,
        train_on_prompt: false,
    };
    let records = read_records(Path::new(&config.data.path), "auto").unwrap();
    let examples: Vec<_> = records.iter().map(|r| encoder.encode(r).unwrap()).collect();
    let batch = LmBatch::new(&examples.iter().collect::<Vec<_>>(), 0, &Device::flex());
    let group = burn_qlora::trainable_params(&model, burn_qlora::LoraBias::None);
    let loss = CausalLm::new(model, group, 1).loss(&batch);
    loss.into_scalar::<f32>()
}

/// Runs one of this package's binaries; panics with its output if it fails.
fn run_binary(path: &str, args: &[&str]) {
    let output = std::process::Command::new(path)
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{path} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn only_response_tokens_and_their_eos_count() {
    let ws = Workspace::new("mask");
    let tokenizer = ws.tokenizer();
    let template = ChatTemplate::HumanResponse;
    let encoder = Encoder {
        tokenizer: &tokenizer,
        template: &template,
        max_seq_len: 64,
        train_on_prompt: false,
    };
    let record = Record::Chat(vec![
        Message::new(Role::User, "name a red fruit"),
        Message::new(Role::Assistant, "apple"),
    ]);
    let example = encoder.encode(&record).unwrap();
    let words: Vec<String> = example
        .ids
        .iter()
        .map(|&id| tokenizer.decode(&[id]).unwrap())
        .collect();
    // BOS, "### HUMAN :", the question, "### RESPONSE :", then the answer and EOS.
    let trained: Vec<&str> = words
        .iter()
        .zip(&example.trained)
        .filter(|(_, trained)| **trained)
        .map(|(word, _)| word.as_str())
        .collect();
    assert_eq!(example.ids[0], 1, "BOS first");
    assert_eq!(*example.ids.last().unwrap(), 2, "EOS after the response");
    assert_eq!(trained, ["apple", "</s>"], "the answer and EOS");
    assert_eq!(example.trained.iter().filter(|t| **t).count(), 2);
    assert_eq!(example.ids.len(), 1 + 3 + 4 + 3 + 1 + 1);

    let everything = Encoder {
        train_on_prompt: true,
        ..encoder
    };
    assert!(
        everything.encode(&record).unwrap().trained[1..]
            .iter()
            .all(|t| *t)
    );
}

/// Trains 12 steps (checkpoints every 6) with `overrides`; checks the loss over the data fell
/// below 0.8 of its start, and returns the run's config, summary and final loss.
fn train_lowers_the_loss(
    ws: &Workspace,
    golden: &Path,
    overrides: &[&str],
) -> (TrainConfig, apps::train::RunSummary, f32) {
    let mut all = vec!["train.steps=12", "train.checkpoint_every=6"];
    all.extend_from_slice(overrides);
    let config = ws.config(golden, "run", &all);
    let before = mean_loss(ws, &config, trained_model(&config, None));
    let summary = apps::train::run(&config, false).unwrap();
    let adapter = Some(summary.adapter_dir.as_path());
    let after = mean_loss(ws, &config, trained_model(&config, adapter));
    assert!(after < 0.8 * before, "loss {before} -> {after}");
    (config, summary, after)
}

#[test]
fn training_lowers_the_loss_and_writes_an_adapter() {
    let _turn = take_turn();
    let Some(golden) = golden_dir() else { return };
    let ws = Workspace::new("loss");
    let (config, summary, after) = train_lowers_the_loss(&ws, &golden, &[]);
    // Checkpoints hold the adapters, not the base: a few KiB for this model.
    let run = &summary.output_dir;
    let model = run.join("checkpoint/model-2.bpk");
    let size = std::fs::metadata(&model).unwrap().len();
    assert!(size < 400_000, "{} is {size} bytes", model.display());
    // Throughput is logged for every step after an epoch's first.
    let rates = std::fs::read_to_string(run.join("train/epoch-2/Tokens_per_Second.log")).unwrap();
    // `value,count` a step, then `value,final`.
    let rates: Vec<f64> = rates
        .lines()
        .filter_map(|line| line.split_once(','))
        .filter(|(_, count)| *count != "final")
        .map(|(value, _)| value.parse().unwrap())
        .collect();
    assert_eq!(rates.len(), 6, "one entry a step");
    assert!(rates[1..].iter().all(|&rate| rate > 0.0), "{rates:?}");

    // export-peft of the last checkpoint is the final adapter; of the first, another.
    let run_arg = run.display().to_string();
    for checkpoint in ["1", "2"] {
        let out = ws.dir.join(format!("exported-{checkpoint}"));
        let out_arg = out.display().to_string();
        run_binary(
            env!("CARGO_BIN_EXE_export-peft"),
            &[
                "--run",
                &run_arg,
                "--checkpoint",
                checkpoint,
                "--output",
                &out_arg,
                "--backend",
                "flex",
            ],
        );
        let same = adapter_tensors(&out) == adapter_tensors(&summary.adapter_dir);
        assert_eq!(same, checkpoint == "2", "checkpoint {checkpoint}");
    }

    // The merged dense model computes what the trained one did, and has its tokenizer.
    let merged = run.join("merged");
    run_binary(
        env!("CARGO_BIN_EXE_merge"),
        &["--run", &run_arg, "--dtype", "f32", "--backend", "flex"],
    );
    assert!(merged.join("tokenizer.json").is_file());
    let (model, _) = Llama::load(&merged, &LoadOptions::default(), &Device::flex()).unwrap();
    let merged_loss = mean_loss(&ws, &config, model);
    assert!(
        (merged_loss - after).abs() <= 1e-4 * after,
        "merged {merged_loss}, trained {after}"
    );
}

/// bf16 weights and compute (`model.dtype=bf16`): the adapters train too. The loss is measured
/// in f32 on the trained adapter.
#[test]
fn bf16_training_lowers_the_loss() {
    let _turn = take_turn();
    let Some(golden) = golden_dir() else { return };
    let ws = Workspace::new("bf16");
    train_lowers_the_loss(&ws, &golden, &["model.dtype=\"bf16\""]);
}

fn adapter_tensors(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let adapter = PeftAdapter::load(dir, &Device::flex()).unwrap();
    let mut tensors = Vec::new();
    for (module, (a, b)) in &adapter.weights {
        tensors.push((
            format!("{module}.A"),
            a.to_data().try_to_vec::<f32>().unwrap(),
        ));
        tensors.push((
            format!("{module}.B"),
            b.to_data().try_to_vec::<f32>().unwrap(),
        ));
    }
    tensors
}

/// The final adapters of two runs agree within 1e-5 everywhere.
fn assert_same_adapters(expected: &TrainConfig, actual: &TrainConfig) {
    let expected = adapter_tensors(&expected.output_dir().join("adapter"));
    let actual = adapter_tensors(&actual.output_dir().join("adapter"));
    assert_eq!(expected.len(), actual.len());
    for ((name, want), (_, got)) in expected.iter().zip(&actual) {
        let error = want
            .iter()
            .zip(got)
            .map(|(w, g)| (w - g).abs())
            .fold(0.0f32, f32::max);
        assert!(error <= 1e-5, "{name}: max abs difference {error}");
    }
}

#[test]
fn a_resumed_run_equals_an_uninterrupted_one() {
    let _turn = take_turn();
    let Some(golden) = golden_dir() else { return };
    let ws = Workspace::new("resume");
    let straight = ws.config(
        &golden,
        "straight",
        &["train.steps=4", "train.checkpoint_every=2"],
    );
    apps::train::run(&straight, false).unwrap();

    // The same run stopped after its first checkpoint, then resumed for the rest.
    let first = ws.config(
        &golden,
        "resumed",
        &["train.steps=2", "train.checkpoint_every=2"],
    );
    apps::train::run(&first, false).unwrap();
    let mut rest = TrainConfig::from_run(&first.output_dir()).unwrap();
    rest.train.steps = 4;
    apps::train::run(&rest, true).unwrap();

    assert_same_adapters(&straight, &rest);
    // The second epoch's training losses are the same too.
    let losses = |run: &TrainConfig| {
        std::fs::read_to_string(run.output_dir().join("train/epoch-2/Loss.log")).unwrap()
    };
    assert_eq!(losses(&straight), losses(&rest));
}

/// Activation checkpointing recomputes activations in backward instead of keeping them, and
/// dense weights keep each layer's dequantized weights for its backward instead of dequantizing
/// them again: they change memory and time, not results.
#[test]
fn activation_checkpointing_and_dense_weights_give_the_same_adapter() {
    let _turn = take_turn();
    let Some(golden) = golden_dir() else { return };
    let ws = Workspace::new("recompute");
    let [kept, recomputed, dense] = ["kept", "recomputed", "dense"].map(|run| {
        let recompute = format!("train.activation_checkpointing={}", run == "recomputed");
        let dense = format!("train.dense_weights={}", run == "dense");
        let config = ws.config(
            &golden,
            run,
            &[
                "train.steps=4",
                "train.checkpoint_every=4",
                &recompute,
                &dense,
            ],
        );
        apps::train::run(&config, false).unwrap();
        config
    });
    assert_same_adapters(&kept, &recomputed);
    assert_same_adapters(&kept, &dense);
}

#[test]
fn a_truncated_checkpoint_is_refused_and_nothing_is_overwritten() {
    let _turn = take_turn();
    let Some(golden) = golden_dir() else { return };
    let ws = Workspace::new("corrupt");
    let config = ws.config(
        &golden,
        "run",
        &["train.steps=2", "train.checkpoint_every=2"],
    );
    apps::train::run(&config, false).unwrap();
    let checkpoint = config.output_dir().join("checkpoint");
    let model = checkpoint.join("model-1.bpk");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let listing = |dir: &Path| {
        let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().into_string().unwrap(),
                    e.metadata().unwrap().len(),
                )
            })
            .collect();
        files.sort();
        files
    };
    let before = listing(&checkpoint);

    let mut more = TrainConfig::from_run(&config.output_dir()).unwrap();
    more.train.steps = 4;
    let err = apps::train::run(&more, true).unwrap_err().to_string();
    assert!(err.contains("model-1.bpk"), "{err}");
    assert_eq!(listing(&checkpoint), before);

    // Starting over in a folder that holds checkpoints is refused as well.
    let err = apps::train::run(&config, false).unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");
}
