//! Meta's own LLaMA-2 release: `params.json` and `consolidated.NN.pth`, one shard per
//! model-parallel rank (1 for 7B, 2 for 13B, 8 for 70B). Tensors keep Meta's names and its
//! interleaved rotary layout of q and k; both are translated to Hugging Face's here, so the
//! model code sees one layout whatever the checkpoint.

use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};
use pytorch_reader::PytorchReader;
use serde::Deserialize;

use crate::gguf::hf_rotary_layout;
use crate::{LlamaConfig, LlamaError};

const PARAMS: &str = "params.json";

/// The shards of a Meta checkpoint, opened lazily: tensors are read one at a time.
pub struct MetaCheckpoint {
    shards: Vec<(PathBuf, PytorchReader)>,
    heads: usize,
    kv_heads: usize,
}

/// How a tensor was split across model-parallel shards (fairscale's layers).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Split {
    /// `ColumnParallelLinear`: output rows split; shards are stacked.
    Rows,
    /// `RowParallelLinear` and `ParallelEmbedding`: columns split; shards side by side.
    Cols,
    /// Norm weights: every shard holds the whole tensor.
    Replicated,
}

/// Meta's name for a Hugging Face tensor name, and how it is split.
fn meta_name(hf_name: &str) -> Option<(String, Split)> {
    let fixed = match hf_name {
        "model.embed_tokens.weight" => Some(("tok_embeddings.weight", Split::Cols)),
        "model.norm.weight" => Some(("norm.weight", Split::Replicated)),
        "lm_head.weight" => Some(("output.weight", Split::Rows)),
        _ => None,
    };
    if let Some((name, split)) = fixed {
        return Some((name.to_string(), split));
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, name) = rest.split_once('.')?;
    let (meta, split) = match name {
        "self_attn.q_proj.weight" => ("attention.wq.weight", Split::Rows),
        "self_attn.k_proj.weight" => ("attention.wk.weight", Split::Rows),
        "self_attn.v_proj.weight" => ("attention.wv.weight", Split::Rows),
        "self_attn.o_proj.weight" => ("attention.wo.weight", Split::Cols),
        "mlp.gate_proj.weight" => ("feed_forward.w1.weight", Split::Rows),
        "mlp.down_proj.weight" => ("feed_forward.w2.weight", Split::Cols),
        "mlp.up_proj.weight" => ("feed_forward.w3.weight", Split::Rows),
        "input_layernorm.weight" => ("attention_norm.weight", Split::Replicated),
        "post_attention_layernorm.weight" => ("ffn_norm.weight", Split::Replicated),
        _ => return None,
    };
    Some((format!("layers.{layer}.{meta}"), split))
}

/// The keys of `params.json`; Meta's reference code reads these and no others.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    dim: usize,
    n_layers: usize,
    n_heads: usize,
    n_kv_heads: Option<usize>,
    /// -1 in the LLaMA-2 release: the tokenizer decides, so the embedding's shape does here.
    vocab_size: i64,
    multiple_of: usize,
    ffn_dim_multiplier: Option<f64>,
    norm_eps: f64,
    rope_theta: Option<f64>,
    max_seq_len: Option<usize>,
    use_scaled_rope: Option<bool>,
}

impl Params {
    /// The SwiGLU width as Meta's `FeedForward` computes it: 2/3 of 4·dim, scaled by
    /// `ffn_dim_multiplier`, rounded up to `multiple_of` (11008 for 7B, 28672 for 70B).
    fn intermediate_size(&self) -> usize {
        let mut hidden = 2 * (4 * self.dim) / 3;
        if let Some(multiplier) = self.ffn_dim_multiplier {
            hidden = (multiplier * hidden as f64) as usize;
        }
        hidden.div_ceil(self.multiple_of) * self.multiple_of
    }
}

impl MetaCheckpoint {
    /// Opens `params.json` and every `consolidated.*.pth` in `dir`, returning the checkpoint
    /// and the model config it describes.
    pub fn open(dir: &Path) -> Result<(Self, LlamaConfig), LlamaError> {
        let params_path = dir.join(PARAMS);
        let text = std::fs::read(&params_path).map_err(|err| LlamaError::io(&params_path, err))?;
        let params: Params = serde_json::from_slice(&text)
            .map_err(|err| LlamaError::Config(format!("{}: {err}", params_path.display())))?;
        if params.use_scaled_rope == Some(true) {
            return Err(LlamaError::Config(format!(
                "{}: use_scaled_rope (LLaMA-3.1 rope scaling) is not supported",
                params_path.display()
            )));
        }

        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|err| LlamaError::io(dir, err))?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| {
                path.file_name()
                    .and_then(|name| name.to_str())
                    .is_some_and(|name| name.starts_with("consolidated.") && name.ends_with(".pth"))
            })
            .collect();
        // consolidated.00.pth, .01, ...: the rank order the shards concatenate in.
        paths.sort();
        if paths.is_empty() {
            return Err(LlamaError::checkpoint(
                dir,
                "no consolidated.*.pth next to params.json",
            ));
        }
        let shards = paths
            .into_iter()
            .map(|path| {
                let reader = PytorchReader::new(&path)
                    .map_err(|err| LlamaError::checkpoint(&path, err.to_string()))?;
                Ok((path, reader))
            })
            .collect::<Result<Vec<_>, LlamaError>>()?;

        let vocab_size = match usize::try_from(params.vocab_size) {
            Ok(size) => size,
            Err(_) => {
                let (path, reader) = &shards[0];
                let embedding = reader.get("tok_embeddings.weight").ok_or_else(|| {
                    LlamaError::MissingTensor {
                        name: format!("tok_embeddings.weight in {}", path.display()),
                    }
                })?;
                embedding.shape()[0]
            }
        };
        let config = LlamaConfig {
            vocab_size,
            hidden_size: params.dim,
            intermediate_size: params.intermediate_size(),
            num_hidden_layers: params.n_layers,
            num_attention_heads: params.n_heads,
            num_key_value_heads: params.n_kv_heads,
            head_dim: None,
            rms_norm_eps: params.norm_eps,
            rope_theta: params.rope_theta.unwrap_or(10000.0),
            max_position_embeddings: params.max_seq_len.unwrap_or(4096),
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
        };
        config.validate()?;
        let checkpoint = Self {
            shards,
            heads: config.num_attention_heads,
            kv_heads: config.num_kv_heads(),
        };
        Ok((checkpoint, config))
    }

    /// The tensor Hugging Face calls `hf_name`, joined from the shards, converted to f32,
    /// with q and k in Hugging Face's rotary layout, checked to have `shape`.
    pub fn read(&self, hf_name: &str, shape: &[usize]) -> Result<TensorData, LlamaError> {
        let (name, split) = meta_name(hf_name).ok_or_else(|| LlamaError::MissingTensor {
            name: hf_name.to_string(),
        })?;
        let described = format!("{name} ({hf_name})");
        let shards = match split {
            Split::Replicated => &self.shards[..1],
            Split::Rows | Split::Cols => &self.shards[..],
        };
        let mut parts = Vec::with_capacity(shards.len());
        for (path, reader) in shards {
            let tensor = reader.get(&name).ok_or_else(|| LlamaError::MissingTensor {
                name: format!("{described} in {}", path.display()),
            })?;
            let dtype = match tensor.dtype() {
                pytorch_reader::DType::F32 => DType::F32,
                pytorch_reader::DType::F16 => DType::F16,
                pytorch_reader::DType::BF16 => DType::BF16,
                other => {
                    return Err(LlamaError::Dtype {
                        name: described,
                        dtype: format!("{other:?}"),
                    });
                }
            };
            let bytes = tensor.read().map_err(|err| LlamaError::io(path, err))?;
            let values = TensorData::from_bytes_vec(bytes, tensor.shape().to_vec(), dtype)
                .convert::<f32>()
                .try_into_vec::<f32>()
                .map_err(|err| LlamaError::checkpoint(path, format!("{name}: {err:?}")))?;
            parts.push((tensor.shape().to_vec(), values));
        }
        let (actual, values) = join(split, parts).map_err(|detail| {
            LlamaError::checkpoint(&self.shards[0].0, format!("{described}: {detail}"))
        })?;
        LlamaError::check_shape(&actual, shape, || described)?;
        Ok(hf_rotary_layout(
            hf_name,
            values,
            shape,
            self.heads,
            self.kv_heads,
        ))
    }
}

/// Joins shards of a 1-D or 2-D tensor as `split` says; the result's shape and values.
fn join(
    split: Split,
    parts: Vec<(Vec<usize>, Vec<f32>)>,
) -> Result<(Vec<usize>, Vec<f32>), String> {
    let mut parts = parts.into_iter();
    let (mut shape, mut values) = parts.next().ok_or("no shard")?;
    for (part_shape, part) in parts {
        match (split, shape.as_slice(), part_shape.as_slice()) {
            (Split::Rows, [rows, cols], [part_rows, part_cols]) if cols == part_cols => {
                values.extend(part);
                shape = vec![rows + part_rows, *cols];
            }
            (Split::Cols, [rows, cols], [part_rows, part_cols]) if rows == part_rows => {
                let joined_cols = cols + part_cols;
                let mut joined = Vec::with_capacity(rows * joined_cols);
                for row in 0..*rows {
                    joined.extend_from_slice(&values[row * cols..(row + 1) * cols]);
                    joined.extend_from_slice(&part[row * part_cols..(row + 1) * part_cols]);
                }
                values = joined;
                shape = vec![*rows, joined_cols];
            }
            _ => {
                return Err(format!(
                    "shards of shapes {shape:?} and {part_shape:?} do not join ({split:?})"
                ));
            }
        }
    }
    Ok((shape, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(dim: usize, multiple_of: usize, ffn_dim_multiplier: Option<f64>) -> Params {
        Params {
            dim,
            n_layers: 1,
            n_heads: 1,
            n_kv_heads: None,
            vocab_size: -1,
            multiple_of,
            ffn_dim_multiplier,
            norm_eps: 1e-5,
            rope_theta: None,
            max_seq_len: None,
            use_scaled_rope: None,
        }
    }

    #[test]
    fn intermediate_size_matches_the_released_models() {
        assert_eq!(params(4096, 256, None).intermediate_size(), 11008);
        assert_eq!(params(5120, 256, None).intermediate_size(), 13824);
        assert_eq!(params(8192, 4096, Some(1.3)).intermediate_size(), 28672);
    }

    #[test]
    fn shards_join_along_the_split_axis() {
        let a = (vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let b = (vec![2, 1], vec![5.0, 6.0]);
        let (shape, values) = join(Split::Cols, vec![a.clone(), b]).unwrap();
        assert_eq!(shape, [2, 3]);
        assert_eq!(values, [1.0, 2.0, 5.0, 3.0, 4.0, 6.0]);
        let (shape, values) = join(Split::Rows, vec![a.clone(), a.clone()]).unwrap();
        assert_eq!(shape, [4, 2]);
        assert_eq!(values[4..], [1.0, 2.0, 3.0, 4.0]);
        assert!(join(Split::Rows, vec![a, (vec![1, 3], vec![0.0; 3])]).is_err());
    }
}
