//! Hugging Face safetensors checkpoints, single file or sharded, read tensor by tensor: only the
//! header is parsed up front, so a 7B checkpoint never sits in memory whole.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};
use serde::Deserialize;

use crate::LlamaError;

const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// Where each tensor of a checkpoint lies.
pub struct SafetensorsCheckpoint {
    entries: HashMap<String, Entry>,
}

struct Entry {
    file: PathBuf,
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

#[derive(Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

#[derive(Deserialize)]
struct Index {
    weight_map: HashMap<String, String>,
}

impl SafetensorsCheckpoint {
    /// `model.safetensors`, or the shards `model.safetensors.index.json` lists, in `dir`.
    pub fn open(dir: &Path) -> Result<Self, LlamaError> {
        let index_path = dir.join(INDEX);
        let files: Vec<PathBuf> = if index_path.is_file() {
            let text =
                std::fs::read(&index_path).map_err(|err| LlamaError::io(&index_path, err))?;
            let index: Index = serde_json::from_slice(&text)
                .map_err(|err| LlamaError::checkpoint(&index_path, err.to_string()))?;
            let mut shards: Vec<String> = index.weight_map.into_values().collect();
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|shard| dir.join(shard)).collect()
        } else {
            vec![dir.join(SINGLE)]
        };
        let mut entries = HashMap::new();
        for file in files {
            read_header(&file, &mut entries)?;
        }
        Ok(Self { entries })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|entry| entry.shape.as_slice())
    }

    /// The tensor `name`, checked to have `shape`, in the dtype it is stored in.
    pub fn read(&self, name: &str, shape: &[usize]) -> Result<TensorData, LlamaError> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| LlamaError::MissingTensor {
                name: name.to_string(),
            })?;
        LlamaError::check_shape(&entry.shape, shape, || name.to_string())?;
        let mut file = File::open(&entry.file).map_err(|err| LlamaError::io(&entry.file, err))?;
        let mut bytes = vec![0u8; (entry.end - entry.start) as usize];
        file.seek(SeekFrom::Start(entry.start))
            .and_then(|_| file.read_exact(&mut bytes))
            .map_err(|err| LlamaError::io(&entry.file, err))?;
        Ok(TensorData::from_bytes_vec(
            bytes,
            shape.to_vec(),
            entry.dtype,
        ))
    }
}

fn read_header(path: &Path, entries: &mut HashMap<String, Entry>) -> Result<(), LlamaError> {
    let mut file = File::open(path).map_err(|err| LlamaError::io(path, err))?;
    let file_len = file
        .metadata()
        .map_err(|err| LlamaError::io(path, err))?
        .len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|_| LlamaError::checkpoint(path, "shorter than a safetensors header"))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > file_len.saturating_sub(8) || header_len > 100 << 20 {
        return Err(LlamaError::checkpoint(
            path,
            format!("header length {header_len} does not fit a {file_len}-byte file"),
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|err| LlamaError::io(path, err))?;
    let mut header: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|err| LlamaError::checkpoint(path, format!("header: {err}")))?;
    header.remove("__metadata__");
    let data_start = 8 + header_len;
    for (name, value) in header {
        let entry: HeaderEntry = serde_json::from_value(value)
            .map_err(|err| LlamaError::checkpoint(path, format!("{name}: {err}")))?;
        let dtype = match entry.dtype.as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            other => {
                return Err(LlamaError::Dtype {
                    name,
                    dtype: other.to_string(),
                });
            }
        };
        let [start, end] = entry.data_offsets;
        let expected = entry.shape.iter().product::<usize>() as u64 * dtype.size() as u64;
        if end < start || end - start != expected || data_start + end > file_len {
            return Err(LlamaError::checkpoint(
                path,
                format!("{name}: data offsets {start}..{end} do not fit its shape or the file"),
            ));
        }
        entries.insert(
            name,
            Entry {
                file: path.to_path_buf(),
                dtype,
                shape: entry.shape,
                start: data_start + start,
                end: data_start + end,
            },
        );
    }
    Ok(())
}
