//! Meta's checkpoint layout (`params.json` + `consolidated.NN.pth`): the golden tiny LLaMA is
//! rewritten the way Meta ships weights (Meta names, interleaved rotary rows in q and k, split
//! over two model-parallel shards like 13B) and must give transformers' logits again.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use integration_tests::torch_save::{StateTensor, save_state_dict};
use integration_tests::{GoldenFile, golden_dir, golden_input_ids};
use llama_burn::{Llama, LoadOptions};
use safetensors::SafeTensors;

/// Max absolute error on the logits, f32 (as for the Hugging Face checkpoint).
const TOLERANCE: f32 = 1e-4;
const HEADS: usize = 8;
const KV_HEADS: usize = 4;
const PARAMS: &str = r#"{"dim": 128, "n_layers": 3, "n_heads": 8, "n_kv_heads": 4,
    "vocab_size": -1, "multiple_of": 32, "norm_eps": 1e-05}"#;

/// How fairscale splits a tensor across ranks.
enum Split {
    Rows,
    Cols,
    Replicated,
}

/// Meta's name and split for a Hugging Face name, written out from Meta's `model.py`.
fn meta(hf: &str) -> (String, Split) {
    let fixed = [
        (
            "model.embed_tokens.weight",
            "tok_embeddings.weight",
            Split::Cols,
        ),
        ("model.norm.weight", "norm.weight", Split::Replicated),
        ("lm_head.weight", "output.weight", Split::Rows),
    ];
    for (from, to, split) in fixed {
        if hf == from {
            return (to.to_string(), split);
        }
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, name) = rest.split_once('.').unwrap();
    let (to, split) = match name {
        "self_attn.q_proj.weight" => ("attention.wq.weight", Split::Rows),
        "self_attn.k_proj.weight" => ("attention.wk.weight", Split::Rows),
        "self_attn.v_proj.weight" => ("attention.wv.weight", Split::Rows),
        "self_attn.o_proj.weight" => ("attention.wo.weight", Split::Cols),
        "mlp.gate_proj.weight" => ("feed_forward.w1.weight", Split::Rows),
        "mlp.down_proj.weight" => ("feed_forward.w2.weight", Split::Cols),
        "mlp.up_proj.weight" => ("feed_forward.w3.weight", Split::Rows),
        "input_layernorm.weight" => ("attention_norm.weight", Split::Replicated),
        "post_attention_layernorm.weight" => ("ffn_norm.weight", Split::Replicated),
        other => panic!("unexpected tensor {other}"),
    };
    (format!("layers.{layer}.{to}"), split)
}

/// Hugging Face's q/k rows (halves per head) back to Meta's interleaved pairs: the permutation
/// `convert_llama_weights_to_hf.py` applies, undone.
fn interleave_rotary(values: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let head_dim = values.len() / cols / heads;
    let half = head_dim / 2;
    let mut out = vec![0.0; values.len()];
    for head in 0..heads {
        for i in 0..half {
            for side in 0..2 {
                let meta_row = head * head_dim + 2 * i + side;
                let hf_row = head * head_dim + side * half + i;
                out[meta_row * cols..(meta_row + 1) * cols]
                    .copy_from_slice(&values[hf_row * cols..(hf_row + 1) * cols]);
            }
        }
    }
    out
}

/// Writes the golden model as Meta would ship it on `ranks` model-parallel ranks, leaving out
/// the tensors `skip` names; returns the folder.
fn write_meta_checkpoint(golden: &Path, ranks: usize, skip: &str) -> PathBuf {
    let tag = if skip.is_empty() { "whole" } else { "partial" };
    let dir = std::env::temp_dir().join(format!("llama-meta-{}-{ranks}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("params.json"), PARAMS).unwrap();
    let bytes = std::fs::read(golden.join("llama_tiny/model.safetensors")).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let mut shards: Vec<Vec<StateTensor>> = (0..ranks).map(|_| Vec::new()).collect();
    for (hf_name, view) in tensors.tensors() {
        let (name, split) = meta(&hf_name);
        if name == skip {
            continue;
        }
        let shape = view.shape().to_vec();
        let cols = *shape.last().unwrap();
        let mut values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        if hf_name.ends_with("q_proj.weight") {
            values = interleave_rotary(&values, HEADS, cols);
        } else if hf_name.ends_with("k_proj.weight") {
            values = interleave_rotary(&values, KV_HEADS, cols);
        }
        for (rank, shard) in shards.iter_mut().enumerate() {
            let (shape, values) = match split {
                Split::Replicated => (shape.clone(), values.clone()),
                Split::Rows => {
                    let rows = shape[0] / ranks;
                    let part = values[rank * rows * cols..(rank + 1) * rows * cols].to_vec();
                    (vec![rows, cols], part)
                }
                Split::Cols => {
                    let part_cols = cols / ranks;
                    let part = values
                        .chunks_exact(cols)
                        .flat_map(|row| &row[rank * part_cols..(rank + 1) * part_cols])
                        .copied()
                        .collect();
                    (vec![shape[0], part_cols], part)
                }
            };
            shard.push(StateTensor {
                name: name.clone(),
                shape,
                values,
            });
        }
    }
    for (rank, shard) in shards.iter().enumerate() {
        save_state_dict(&dir.join(format!("consolidated.{rank:02}.pth")), shard).unwrap();
    }
    dir
}

#[test]
fn meta_shards_give_transformers_logits() {
    let Some(golden) = golden_dir() else { return };
    let device = Device::flex();
    let expected = GoldenFile::open(&golden.join("llama_tiny/expected.safetensors"));
    for ranks in [1, 2] {
        let dir = write_meta_checkpoint(&golden, ranks, "");
        let (model, config) = Llama::load(&dir, &LoadOptions::default(), &device).unwrap();
        // The vocabulary comes from the embedding (vocab_size -1), the MLP width from multiple_of.
        assert_eq!(
            (
                config.vocab_size,
                config.intermediate_size,
                config.num_kv_heads()
            ),
            (512, 352, 4),
            "{ranks} ranks"
        );
        let logits = model.forward(
            golden_input_ids(&golden.join("llama_tiny/expected.safetensors"), &device),
            None,
        );
        let error = (logits - expected.tensor::<3>("logits", &device))
            .abs()
            .max()
            .into_scalar::<f32>();
        assert!(error <= TOLERANCE, "{ranks} ranks: max abs error {error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn a_shard_missing_a_tensor_is_named() {
    let Some(golden) = golden_dir() else { return };
    let dir = write_meta_checkpoint(&golden, 2, "layers.1.attention.wk.weight");
    let err = Llama::load(&dir, &LoadOptions::default(), &Device::flex())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layers.1.attention.wk.weight") && err.contains("consolidated.00.pth"),
        "{err}"
    );

    // A params.json key Meta's code does not know is named.
    std::fs::write(
        dir.join("params.json"),
        PARAMS.replace("\"dim\"", "\"dimension\""),
    )
    .unwrap();
    let err = Llama::load(&dir, &LoadOptions::default(), &Device::flex())
        .unwrap_err()
        .to_string();
    assert!(err.contains("dimension"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
