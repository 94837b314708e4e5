//! A model written in Hugging Face's layout (`config.json`, `model.safetensors` or shards with
//! `model.safetensors.index.json`), loadable by transformers, vLLM and llama.cpp's converter.
//! Adapters are merged into their projection on the way (the 4-bit base dequantized, plus
//! `scaling·B·A`), one tensor at a time, so the peak is one shard.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, Tensor, TensorData};
use burn_qlora::{Projection, write_atomically, write_atomically_with};
use safetensors::tensor::{Dtype, TensorView};

use crate::{Llama, LlamaConfig, LlamaError, RmsNorm};

const WEIGHTS_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// How [`Llama::save_hf`] writes a model.
#[derive(Clone, Debug)]
pub struct SaveOptions {
    /// The dtype of the written weights: f32, f16 or bf16. Default bf16, as LLaMA ships.
    pub dtype: DType,
    /// Largest shard in bytes; a bigger model is split into `model-0000i-of-0000n.safetensors`.
    /// Default 5 GB, as the Hugging Face Hub prefers.
    pub max_shard_bytes: usize,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            dtype: DType::BF16,
            max_shard_bytes: 5_000_000_000,
        }
    }
}

/// Where one tensor of the written model comes from.
enum Source<'a> {
    Embedding,
    Norm(&'a RmsNorm),
    /// A projection's weight `[out, in]` (merged with its adapter), and its bias when `true`.
    Projection(&'a Projection, bool),
}

/// A tensor to write: its name, its values on the host, torch's shape.
type HostTensor = (String, TensorData, Vec<usize>);

/// One tensor of the written model: Hugging Face's name, torch's shape, its source.
struct Entry<'a> {
    name: String,
    shape: Vec<usize>,
    source: Source<'a>,
}

impl Llama {
    /// Writes `config.json` and the weights to `dir`, each file atomically; returns the files
    /// written. Tokenizer files are separate: see [`crate::Tokenizer::save_hf`].
    pub fn save_hf(
        &self,
        config: &LlamaConfig,
        dir: &Path,
        options: &SaveOptions,
    ) -> Result<Vec<PathBuf>, LlamaError> {
        let (safetensors_dtype, dtype_name) = match options.dtype {
            DType::F32 => (Dtype::F32, "float32"),
            DType::F16 => (Dtype::F16, "float16"),
            DType::BF16 => (Dtype::BF16, "bfloat16"),
            other => {
                return Err(LlamaError::Config(format!(
                    "weights are written as f32, f16 or bf16, not {other:?}"
                )));
            }
        };
        std::fs::create_dir_all(dir).map_err(|source| LlamaError::io(dir, source))?;
        let entries = self.entries(config);
        let shards = plan_shards(&entries, options.dtype.size(), options.max_shard_bytes);
        let mut written = Vec::new();
        let mut weight_map = BTreeMap::new();
        for (index, shard) in shards.iter().enumerate() {
            let file = match shards.len() {
                1 => WEIGHTS_FILE.to_string(),
                n => format!("model-{:05}-of-{n:05}.safetensors", index + 1),
            };
            let mut tensors = Vec::new();
            for entry in shard {
                tensors.extend(self.tensors_of(entry, options.dtype)?);
                weight_map.insert(entry.name.clone(), file.clone());
                if let Source::Projection(_, true) = entry.source {
                    weight_map.insert(bias_name(&entry.name), file.clone());
                }
            }
            let path = dir.join(&file);
            write_safetensors(&path, &tensors, safetensors_dtype)?;
            written.push(path);
        }
        if shards.len() > 1 {
            let total_size: usize = entries
                .iter()
                .map(|entry| entry_bytes(entry, options.dtype.size()))
                .sum();
            let index = serde_json::json!({
                "metadata": { "total_size": total_size },
                "weight_map": weight_map,
            });
            written.push(write_json(&dir.join(INDEX_FILE), &index)?);
        }
        let layer = self.model.layers.first();
        let attention_bias = layer.is_some_and(|l| l.self_attn.q_proj.has_bias());
        let mlp_bias = layer.is_some_and(|l| l.mlp.gate_proj.has_bias());
        let json = config.to_hf_json(dtype_name, attention_bias, mlp_bias);
        written.push(write_json(&dir.join("config.json"), &json)?);
        Ok(written)
    }

    /// Every tensor of the model, in the order transformers writes them.
    fn entries(&self, config: &LlamaConfig) -> Vec<Entry<'_>> {
        let hidden = config.hidden_size;
        let mut entries = vec![Entry {
            name: "model.embed_tokens.weight".into(),
            shape: vec![config.vocab_size, hidden],
            source: Source::Embedding,
        }];
        for (i, layer) in self.model.layers.iter().enumerate() {
            let prefix = format!("model.layers.{i}");
            let attn = &layer.self_attn;
            let mlp = &layer.mlp;
            entries.push(norm_entry(
                format!("{prefix}.input_layernorm.weight"),
                &layer.input_layernorm,
            ));
            for (name, proj) in [
                ("q_proj", &attn.q_proj),
                ("k_proj", &attn.k_proj),
                ("v_proj", &attn.v_proj),
                ("o_proj", &attn.o_proj),
            ] {
                entries.push(projection_entry(
                    format!("{prefix}.self_attn.{name}.weight"),
                    proj,
                ));
            }
            entries.push(norm_entry(
                format!("{prefix}.post_attention_layernorm.weight"),
                &layer.post_attention_layernorm,
            ));
            for (name, proj) in [
                ("gate_proj", &mlp.gate_proj),
                ("up_proj", &mlp.up_proj),
                ("down_proj", &mlp.down_proj),
            ] {
                entries.push(projection_entry(
                    format!("{prefix}.mlp.{name}.weight"),
                    proj,
                ));
            }
        }
        entries.push(norm_entry("model.norm.weight".into(), &self.model.norm));
        if let Some(head) = &self.lm_head {
            entries.push(projection_entry("lm_head.weight".into(), head));
        }
        entries
    }

    /// The tensors of `entry` in `dtype`, read back to the host: one, or a projection's weight
    /// and bias.
    fn tensors_of(&self, entry: &Entry, dtype: DType) -> Result<Vec<HostTensor>, LlamaError> {
        let flat = |tensor: Tensor<2>| {
            let n = tensor.shape().num_elements();
            tensor.reshape([n])
        };
        Ok(match entry.source {
            Source::Embedding => vec![(
                entry.name.clone(),
                flat(self.model.embed_tokens.weight.val()),
                entry.shape.clone(),
            )],
            Source::Norm(norm) => {
                vec![(entry.name.clone(), norm.weight.val(), entry.shape.clone())]
            }
            Source::Projection(projection, _) => {
                let merged = projection
                    .to_merged_linear(dtype)
                    .map_err(|err| LlamaError::Config(format!("merging {}: {err}", entry.name)))?;
                // Burn keeps `[in, out]`, torch `[out, in]`.
                let mut tensors = vec![(
                    entry.name.clone(),
                    flat(merged.weight.val().transpose()),
                    entry.shape.clone(),
                )];
                if let Some(bias) = merged.bias {
                    let len = bias.shape().num_elements();
                    tensors.push((bias_name(&entry.name), bias.val(), vec![len]));
                }
                tensors
            }
        }
        .into_iter()
        .map(|(name, tensor, shape)| (name, tensor.cast(dtype).into_data(), shape))
        .collect())
    }
}

fn norm_entry(name: String, norm: &RmsNorm) -> Entry<'_> {
    let shape = norm.weight.shape().dims::<1>().to_vec();
    Entry {
        name,
        shape,
        source: Source::Norm(norm),
    }
}

fn projection_entry(name: String, projection: &Projection) -> Entry<'_> {
    let [d_input, d_output] = projection.dims();
    Entry {
        name,
        shape: vec![d_output, d_input],
        source: Source::Projection(projection, projection.has_bias()),
    }
}

/// `x.weight` -> `x.bias`.
fn bias_name(weight_name: &str) -> String {
    format!("{}.bias", weight_name.trim_end_matches(".weight"))
}

fn entry_bytes(entry: &Entry, element_bytes: usize) -> usize {
    let weight = entry.shape.iter().product::<usize>();
    let bias = match entry.source {
        Source::Projection(_, true) => entry.shape[0],
        _ => 0,
    };
    (weight + bias) * element_bytes
}

/// Entries grouped in order into shards of at most `max_bytes` (a bigger tensor gets its own).
fn plan_shards<'e, 'a>(
    entries: &'e [Entry<'a>],
    element_bytes: usize,
    max_bytes: usize,
) -> Vec<Vec<&'e Entry<'a>>> {
    let mut shards: Vec<Vec<&Entry>> = vec![Vec::new()];
    let mut size = 0;
    for entry in entries {
        let bytes = entry_bytes(entry, element_bytes);
        let last = shards.last_mut().expect("one shard at least");
        if !last.is_empty() && size + bytes > max_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        shards.last_mut().expect("one shard at least").push(entry);
    }
    shards
}

fn write_safetensors(path: &Path, tensors: &[HostTensor], dtype: Dtype) -> Result<(), LlamaError> {
    let views = tensors
        .iter()
        .map(|(name, data, shape)| {
            let view = TensorView::new(dtype, shape.to_vec(), data.as_bytes())
                .map_err(|err| LlamaError::checkpoint(path, format!("{name}: {err}")))?;
            Ok((name.as_str(), view))
        })
        .collect::<Result<Vec<_>, LlamaError>>()?;
    let metadata = std::collections::HashMap::from([("format".into(), "pt".into())]);
    write_atomically_with(path, |temporary| {
        safetensors::serialize_to_file(views, Some(metadata), temporary)
            .map_err(std::io::Error::other)
    })
    .map_err(|source| LlamaError::io(path, source))
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<PathBuf, LlamaError> {
    let text = serde_json::to_vec_pretty(value).expect("JSON serializes");
    write_file(path, &text)
}

/// Writes `bytes` to `path` atomically; returns the path.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<PathBuf, LlamaError> {
    write_atomically(path, bytes).map_err(|source| LlamaError::io(path, source))?;
    Ok(path.to_path_buf())
}
