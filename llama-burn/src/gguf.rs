//! GGUF files (llama.cpp's format): metadata, and tensors dequantized to f32 on load (F32, F16,
//! BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K). Tensors are read one at a time from disk.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use burn::tensor::TensorData;
use half::{bf16, f16};

use crate::{LlamaConfig, LlamaError};

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Self::Int(value) => Some(*value),
            _ => None,
        }
    }

    pub fn as_float(&self) -> Option<f64> {
        match self {
            Self::Float(value) => Some(*value),
            Self::Int(value) => Some(*value as f64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(value) => Some(value),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            Self::Array(values) => Some(values),
            _ => None,
        }
    }
}

struct TensorInfo {
    /// `ne`, innermost first (GGUF's order): the reverse of torch's shape.
    dims: Vec<usize>,
    kind: u32,
    /// From the start of the data section.
    offset: u64,
}

/// A GGUF file: its metadata, and where its tensors are.
pub struct GgufFile {
    path: PathBuf,
    pub metadata: HashMap<String, GgufValue>,
    tensors: HashMap<String, TensorInfo>,
    data_start: u64,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, LlamaError> {
        let file = File::open(path).map_err(|err| LlamaError::io(path, err))?;
        let len = file
            .metadata()
            .map_err(|err| LlamaError::io(path, err))?
            .len();
        let mut reader = Reader {
            inner: BufReader::new(file),
            path,
        };
        if reader.bytes::<4>()? != *b"GGUF" {
            return Err(reader.error("not a GGUF file (bad magic)".into()));
        }
        let version = reader.u32()?;
        if !(2..=3).contains(&version) {
            return Err(reader.error(format!("GGUF version {version}; 2 and 3 are read")));
        }
        let tensor_count = reader.u64()?;
        let kv_count = reader.u64()?;
        let mut metadata = HashMap::new();
        for _ in 0..kv_count {
            let key = reader.string()?;
            let kind = reader.u32()?;
            let value = reader.value(kind)?;
            metadata.insert(key, value);
        }
        let mut tensors = HashMap::new();
        for _ in 0..tensor_count {
            let name = reader.string()?;
            let n_dims = reader.u32()?;
            if n_dims > 4 {
                return Err(reader.error(format!("{name}: {n_dims} dimensions")));
            }
            let dims = (0..n_dims)
                .map(|_| reader.u64().map(|d| d as usize))
                .collect::<Result<Vec<_>, _>>()?;
            let kind = reader.u32()?;
            let offset = reader.u64()?;
            tensors.insert(name, TensorInfo { dims, kind, offset });
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(GgufValue::as_int)
            .unwrap_or(32)
            .max(1) as u64;
        let position = reader
            .inner
            .stream_position()
            .map_err(|err| LlamaError::io(path, err))?;
        let data_start = position.div_ceil(alignment) * alignment;
        let gguf = Self {
            path: path.to_path_buf(),
            metadata,
            tensors,
            data_start,
        };
        for (name, info) in &gguf.tensors {
            let (block, bytes) = block_layout(info.kind).ok_or_else(|| LlamaError::Dtype {
                name: name.clone(),
                dtype: format!("GGUF type {}", info.kind),
            })?;
            let count = info.dims.iter().product::<usize>();
            let end = gguf.data_start + info.offset + (count / block * bytes) as u64;
            if !count.is_multiple_of(block) || end > len {
                return Err(gguf.error(format!("{name}: its data does not fit the file")));
            }
        }
        Ok(gguf)
    }

    fn error(&self, detail: String) -> LlamaError {
        LlamaError::checkpoint(&self.path, detail)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor's shape in torch's order (outermost first).
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors
            .get(name)
            .map(|info| info.dims.iter().rev().copied().collect())
    }

    /// The tensor dequantized to f32, in torch's order.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>, LlamaError> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| LlamaError::MissingTensor {
                name: name.to_string(),
            })?;
        let (block, block_bytes) = block_layout(info.kind).expect("checked at open");
        let count = info.dims.iter().product::<usize>();
        let mut bytes = vec![0u8; count / block * block_bytes];
        let mut file = File::open(&self.path).map_err(|err| LlamaError::io(&self.path, err))?;
        file.seek(SeekFrom::Start(self.data_start + info.offset))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(|err| LlamaError::io(&self.path, err))?;
        Ok(dequantize(info.kind, &bytes, count))
    }

    fn meta(&self, key: &str) -> Result<&GgufValue, LlamaError> {
        self.metadata
            .get(key)
            .ok_or_else(|| self.error(format!("metadata key {key} is missing")))
    }

    fn meta_usize(&self, key: &str) -> Result<usize, LlamaError> {
        self.meta(key)?
            .as_int()
            .map(|v| v as usize)
            .ok_or_else(|| self.error(format!("metadata key {key} is not an integer")))
    }

    /// The model's shape from `<arch>.*` metadata (`llama` architecture).
    pub fn llama_config(&self) -> Result<LlamaConfig, LlamaError> {
        let arch = self
            .meta("general.architecture")?
            .as_str()
            .unwrap_or_default()
            .to_string();
        if arch != "llama" {
            return Err(self.error(format!("architecture {arch:?}; only llama is supported")));
        }
        let key = |name: &str| format!("llama.{name}");
        let vocab_size = match self.metadata.get(&key("vocab_size")) {
            Some(value) => value.as_int().unwrap_or_default() as usize,
            None => self
                .meta("tokenizer.ggml.tokens")?
                .as_array()
                .map_or(0, <[GgufValue]>::len),
        };
        let heads = self.meta_usize(&key("attention.head_count"))?;
        let hidden = self.meta_usize(&key("embedding_length"))?;
        let optional_float =
            |name: &str| self.metadata.get(&key(name)).and_then(GgufValue::as_float);
        let token = |name: &str| {
            self.metadata
                .get(&format!("tokenizer.ggml.{name}"))
                .and_then(GgufValue::as_int)
                .map(|id| id as u32)
        };
        let config = LlamaConfig::new(
            vocab_size,
            hidden,
            self.meta_usize(&key("feed_forward_length"))?,
            self.meta_usize(&key("block_count"))?,
            heads,
        )
        .with_num_key_value_heads(
            self.metadata
                .get(&key("attention.head_count_kv"))
                .and_then(GgufValue::as_int)
                .map(|v| v as usize),
        )
        .with_head_dim(
            self.metadata
                .get(&key("attention.key_length"))
                .and_then(GgufValue::as_int)
                .map(|v| v as usize),
        )
        .with_rms_norm_eps(optional_float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5))
        .with_rope_theta(optional_float("rope.freq_base").unwrap_or(10000.0))
        .with_max_position_embeddings(
            self.metadata
                .get(&key("context_length"))
                .and_then(GgufValue::as_int)
                .map_or(4096, |v| v as usize),
        )
        .with_tie_word_embeddings(!self.contains("output.weight"))
        .with_bos_token_id(token("bos_token_id"))
        .with_eos_token_id(token("eos_token_id"));
        config.validate()?;
        Ok(config)
    }
}

/// Hugging Face's name for a tensor -> GGUF's.
pub(crate) fn gguf_name(hf_name: &str) -> Option<String> {
    let fixed = match hf_name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let part = match rest {
        "input_layernorm.weight" => "attn_norm",
        "post_attention_layernorm.weight" => "ffn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}.weight"))
}

/// The tensor Hugging Face calls `hf_name` from values in Meta's layout: q and k rows
/// unpermuted (with `heads` and `kv_heads`), every other tensor as it is.
pub(crate) fn hf_rotary_layout(
    hf_name: &str,
    values: Vec<f32>,
    shape: &[usize],
    heads: usize,
    kv_heads: usize,
) -> TensorData {
    let cols = shape.last().copied().unwrap_or(1);
    let values = if hf_name.ends_with("self_attn.q_proj.weight") {
        unpermute_rotary(&values, heads, cols)
    } else if hf_name.ends_with("self_attn.k_proj.weight") {
        unpermute_rotary(&values, kv_heads, cols)
    } else {
        values
    };
    TensorData::new(values, shape.to_vec())
}

/// Rows of a q or k weight (`[heads * head_dim, in]`) from the interleaved rotary layout of
/// Meta's checkpoints and GGUF (pairs `2i, 2i+1`) to Hugging Face's halves (`i, i + head_dim/2`).
fn unpermute_rotary(values: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = values.len() / cols;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0.0; values.len()];
    for head in 0..heads {
        for i in 0..half {
            for side in 0..2 {
                let from = head * head_dim + 2 * i + side;
                let to = head * head_dim + side * half + i;
                out[to * cols..(to + 1) * cols]
                    .copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

/// Elements per block and bytes per block of a GGUF tensor type.
fn block_layout(kind: u32) -> Option<(usize, usize)> {
    Some(match kind {
        0 => (1, 4),      // F32
        1 => (1, 2),      // F16
        30 => (1, 2),     // BF16
        2 => (32, 18),    // Q4_0
        3 => (32, 20),    // Q4_1
        6 => (32, 22),    // Q5_0
        7 => (32, 24),    // Q5_1
        8 => (32, 34),    // Q8_0
        12 => (256, 144), // Q4_K
        14 => (256, 210), // Q6_K
        _ => return None,
    })
}

fn half(bytes: &[u8]) -> f32 {
    f16::from_le_bytes([bytes[0], bytes[1]]).to_f32()
}

/// Dequantizes `count` values of type `kind`, following ggml's `dequantize_row_*`.
pub(crate) fn dequantize(kind: u32, bytes: &[u8], count: usize) -> Vec<f32> {
    let (_, block_bytes) = block_layout(kind).expect("a known type");
    let mut out = Vec::with_capacity(count);
    match kind {
        0 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        1 => out.extend(bytes.chunks_exact(2).map(half)),
        30 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        _ => {
            for block in bytes.chunks_exact(block_bytes) {
                dequantize_block(kind, block, &mut out);
            }
        }
    }
    out
}

fn dequantize_block(kind: u32, block: &[u8], out: &mut Vec<f32>) {
    let start = out.len();
    match kind {
        2 | 3 => {
            // Q4_0: (q - 8) * d; Q4_1: q * d + m. Low nibbles first, then high.
            let d = half(&block[0..2]);
            let (m, qs) = if kind == 3 {
                (half(&block[2..4]), &block[4..20])
            } else {
                (-8.0 * d, &block[2..18])
            };
            out.extend(qs.iter().map(|q| f32::from(q & 0x0F) * d + m));
            out.extend(qs.iter().map(|q| f32::from(q >> 4) * d + m));
        }
        6 | 7 => {
            // Q5_0: (q - 16) * d; Q5_1: q * d + m; the fifth bits in a 32-bit word.
            let d = half(&block[0..2]);
            let (m, rest) = if kind == 7 {
                (half(&block[2..4]), &block[4..])
            } else {
                (-16.0 * d, &block[2..])
            };
            let high = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
            let qs = &rest[4..20];
            out.resize(start + 32, 0.0);
            for (j, q) in qs.iter().enumerate() {
                let low = u32::from(q & 0x0F) | (((high >> j) << 4) & 0x10);
                let up = u32::from(q >> 4) | ((high >> (j + 12)) & 0x10);
                out[start + j] = low as f32 * d + m;
                out[start + j + 16] = up as f32 * d + m;
            }
        }
        8 => {
            let d = half(&block[0..2]);
            out.extend(block[2..34].iter().map(|&q| f32::from(q as i8) * d));
        }
        12 => dequantize_q4_k(block, out),
        14 => dequantize_q6_k(block, out),
        _ => unreachable!("types are checked when the file is opened"),
    }
}

/// Scale and min `j` of a Q4_K super-block's 12 packed bytes (6 bits each).
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    let (scale, min) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    };
    (f32::from(scale), f32::from(min))
}

fn dequantize_q4_k(block: &[u8], out: &mut Vec<f32>) {
    let d = half(&block[0..2]);
    let dmin = half(&block[2..4]);
    let scales = &block[4..16];
    let qs = &block[16..144];
    for (chunk, q) in qs.chunks_exact(32).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        out.extend(q.iter().map(|q| d * sc1 * f32::from(q & 0x0F) - dmin * m1));
        out.extend(q.iter().map(|q| d * sc2 * f32::from(q >> 4) - dmin * m2));
    }
}

fn dequantize_q6_k(block: &[u8], out: &mut Vec<f32>) {
    let (ql, qh, scales) = (&block[0..128], &block[128..192], &block[192..208]);
    let d = half(&block[208..210]);
    let start = out.len();
    out.resize(start + 256, 0.0);
    for n in 0..2 {
        let (ql, qh) = (&ql[64 * n..], &qh[32 * n..]);
        let sc = &scales[8 * n..];
        let y = &mut out[start + 128 * n..start + 128 * (n + 1)];
        for l in 0..32 {
            let is = l / 16;
            let q =
                |low: u8, shift: u32| f32::from(((low | (((qh[l] >> shift) & 3) << 4)) as i8) - 32);
            let scale = |i: usize| d * f32::from(sc[is + i] as i8);
            y[l] = scale(0) * q(ql[l] & 0x0F, 0);
            y[l + 32] = scale(2) * q(ql[l + 32] & 0x0F, 2);
            y[l + 64] = scale(4) * q(ql[l] >> 4, 4);
            y[l + 96] = scale(6) * q(ql[l + 32] >> 4, 6);
        }
    }
}

struct Reader<'a> {
    inner: BufReader<File>,
    path: &'a Path,
}

impl Reader<'_> {
    fn error(&self, detail: String) -> LlamaError {
        LlamaError::checkpoint(self.path, detail)
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], LlamaError> {
        let mut buffer = [0u8; N];
        self.inner
            .read_exact(&mut buffer)
            .map_err(|_| self.error("truncated header".into()))?;
        Ok(buffer)
    }

    fn u32(&mut self) -> Result<u32, LlamaError> {
        self.bytes::<4>().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, LlamaError> {
        self.bytes::<8>().map(u64::from_le_bytes)
    }

    fn string(&mut self) -> Result<String, LlamaError> {
        let len = self.u64()?;
        if len > 1 << 24 {
            return Err(self.error(format!("a {len}-byte string in the header")));
        }
        let mut buffer = vec![0u8; len as usize];
        self.inner
            .read_exact(&mut buffer)
            .map_err(|_| self.error("truncated header".into()))?;
        String::from_utf8(buffer).map_err(|_| self.error("a string is not UTF-8".into()))
    }

    fn value(&mut self, kind: u32) -> Result<GgufValue, LlamaError> {
        Ok(match kind {
            0 => GgufValue::Int(i64::from(self.bytes::<1>()?[0])),
            1 => GgufValue::Int(i64::from(self.bytes::<1>()?[0] as i8)),
            2 => GgufValue::Int(i64::from(u16::from_le_bytes(self.bytes()?))),
            3 => GgufValue::Int(i64::from(i16::from_le_bytes(self.bytes()?))),
            4 => GgufValue::Int(i64::from(self.u32()?)),
            5 => GgufValue::Int(i64::from(i32::from_le_bytes(self.bytes()?))),
            6 => GgufValue::Float(f64::from(f32::from_le_bytes(self.bytes()?))),
            7 => GgufValue::Bool(self.bytes::<1>()?[0] != 0),
            8 => GgufValue::Str(self.string()?),
            9 => {
                let item_kind = self.u32()?;
                let len = self.u64()?;
                if len > 1 << 24 {
                    return Err(self.error(format!("an array of {len} items in the header")));
                }
                let items = (0..len)
                    .map(|_| self.value(item_kind))
                    .collect::<Result<_, _>>()?;
                GgufValue::Array(items)
            }
            10 => GgufValue::Int(self.u64()? as i64),
            11 => GgufValue::Int(i64::from_le_bytes(self.bytes()?)),
            12 => GgufValue::Float(f64::from_le_bytes(self.bytes()?)),
            other => return Err(self.error(format!("metadata value type {other}"))),
        })
    }
}

/// GGUF as a checkpoint under Hugging Face's tensor names, q and k rows back in Hugging Face's
/// rotary layout.
pub struct GgufCheckpoint {
    pub file: GgufFile,
    heads: usize,
    kv_heads: usize,
}

impl GgufCheckpoint {
    pub fn new(file: GgufFile, config: &LlamaConfig) -> Self {
        Self {
            file,
            heads: config.num_attention_heads,
            kv_heads: config.num_kv_heads(),
        }
    }

    pub fn read(&self, hf_name: &str, shape: &[usize]) -> Result<TensorData, LlamaError> {
        let name = gguf_name(hf_name).ok_or_else(|| LlamaError::MissingTensor {
            name: hf_name.to_string(),
        })?;
        let described = || format!("{name} ({hf_name})");
        let actual = self
            .file
            .shape(&name)
            .ok_or_else(|| LlamaError::MissingTensor { name: described() })?;
        LlamaError::check_shape(&actual, shape, described)?;
        let values = self.file.read_f32(&name)?;
        Ok(hf_rotary_layout(
            hf_name,
            values,
            shape,
            self.heads,
            self.kv_heads,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(value: f32) -> [u8; 2] {
        f16::from_f32(value).to_le_bytes()
    }

    #[test]
    fn legacy_blocks_follow_ggml() {
        // Q4_1: d = 0.5, m = -1; nibbles 0..16 low, 15..0 high.
        let mut block = Vec::new();
        block.extend(f16_bytes(0.5));
        block.extend(f16_bytes(-1.0));
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let values = dequantize(3, &block, 32);
        assert_eq!(values[0], -1.0);
        assert_eq!(values[15], 6.5);
        assert_eq!(values[16], 6.5);
        assert_eq!(values[31], -1.0);

        // Q4_0: (q - 8) * d.
        let mut block = Vec::new();
        block.extend(f16_bytes(2.0));
        block.extend([0x8F; 16]);
        let values = dequantize(2, &block, 32);
        assert_eq!((values[0], values[16]), (14.0, 0.0));

        // Q8_0: signed bytes times d.
        let mut block = Vec::new();
        block.extend(f16_bytes(0.25));
        block.extend((0..32).map(|j: i32| ((j - 16) as i8) as u8));
        let values = dequantize(8, &block, 32);
        assert_eq!((values[0], values[31]), (-4.0, 3.75));

        // Q5_0: the fifth bit of element j is bit j of qh, of element j + 16 bit j + 16.
        let mut block = Vec::new();
        block.extend(f16_bytes(1.0));
        block.extend(0x0001_0001u32.to_le_bytes());
        block.extend([0x00; 16]);
        let values = dequantize(6, &block, 32);
        assert_eq!(
            (values[0], values[1], values[16], values[17]),
            (0.0, -16.0, 0.0, -16.0)
        );
    }

    #[test]
    fn k_quant_blocks_follow_ggml() {
        // Q4_K with d = 1, dmin = 1, every 6-bit scale 2 and min 1: 2 * q - 1.
        let mut block = Vec::new();
        block.extend(f16_bytes(1.0));
        block.extend(f16_bytes(1.0));
        block.extend([2, 2, 2, 2, 1, 1, 1, 1, 0x12, 0x12, 0x12, 0x12]);
        block.extend([0x31; 128]);
        let values = dequantize(12, &block, 256);
        assert_eq!((values[0], values[32], values[255]), (1.0, 5.0, 5.0));

        // Q6_K with d = 0.5, scales 1: (q - 32) / 2, q = 32 + 1 from ql only.
        let mut block = Vec::new();
        block.extend([0x11; 128]);
        block.extend([0x00; 64]);
        block.extend([1; 16]);
        block.extend(f16_bytes(0.5));
        let values = dequantize(14, &block, 256);
        assert!(
            values.iter().all(|&v| v == (1.0 - 32.0) * 0.5),
            "{:?}",
            &values[..4]
        );
    }

    #[test]
    fn rotary_rows_go_back_to_halves() {
        // One head of 4 rows, interleaved [a0, b0, a1, b1] -> halves [a0, a1, b0, b1].
        let values = [0.0, 10.0, 1.0, 11.0];
        assert_eq!(unpermute_rotary(&values, 1, 1), [0.0, 1.0, 10.0, 11.0]);
    }

    #[test]
    fn names_map_to_gguf() {
        assert_eq!(
            gguf_name("model.layers.3.self_attn.o_proj.weight").as_deref(),
            Some("blk.3.attn_output.weight")
        );
        assert_eq!(
            gguf_name("model.embed_tokens.weight").as_deref(),
            Some("token_embd.weight")
        );
        assert_eq!(gguf_name("model.layers.x"), None);
    }
}
