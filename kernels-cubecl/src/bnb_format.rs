//! The safetensors layout transformers and bitsandbytes write for a 4-bit weight `W`:
//! `W` (U8, `[ceil(n/2), 1]`), `W.absmax`, `W.quant_map`, and with double quantization
//! `W.nested_absmax` and `W.nested_quant_map`; the rest of the state is JSON in the U8 tensor
//! `W.quant_state.bitsandbytes__nf4` (or `__fp4`).

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::DType;
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use crate::codebook::dynamic_map;
use crate::config::NESTED_BLOCK_SIZE;
use crate::{Absmax, NestedAbsmax, QuantError, QuantState, QuantType};

/// The JSON bitsandbytes packs into `quant_state.bitsandbytes__*`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PackedQuantState {
    quant_type: String,
    blocksize: usize,
    dtype: String,
    shape: Vec<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nested_blocksize: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nested_dtype: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nested_offset: Option<f64>,
}

/// One tensor to write: name, dtype, shape, little-endian bytes.
pub struct OwnedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// The tensors that stand for the quantized weight `name` in a bitsandbytes checkpoint.
pub fn to_tensors(name: &str, state: &QuantState) -> Result<Vec<OwnedTensor>, QuantError> {
    state.validate()?;
    let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut tensors = vec![
        OwnedTensor {
            name: name.to_string(),
            dtype: Dtype::U8,
            shape: vec![state.packed.len(), 1],
            bytes: state.packed.clone(),
        },
        OwnedTensor {
            name: format!("{name}.quant_map"),
            dtype: Dtype::F32,
            shape: vec![16],
            bytes: f32_bytes(state.quant_type.code()),
        },
    ];
    let mut json = PackedQuantState {
        quant_type: state.quant_type.name().to_string(),
        blocksize: state.block_size,
        dtype: dtype_name(state.dtype)?.to_string(),
        shape: state.shape.clone(),
        nested_blocksize: None,
        nested_dtype: None,
        nested_offset: None,
    };
    match &state.absmax {
        Absmax::Plain(absmax) => tensors.push(OwnedTensor {
            name: format!("{name}.absmax"),
            dtype: Dtype::F32,
            shape: vec![absmax.len()],
            bytes: f32_bytes(absmax),
        }),
        Absmax::Double(nested) => {
            tensors.push(OwnedTensor {
                name: format!("{name}.absmax"),
                dtype: Dtype::U8,
                shape: vec![nested.codes.len()],
                bytes: nested.codes.clone(),
            });
            tensors.push(OwnedTensor {
                name: format!("{name}.nested_absmax"),
                dtype: Dtype::F32,
                shape: vec![nested.nested_absmax.len()],
                bytes: f32_bytes(&nested.nested_absmax),
            });
            tensors.push(OwnedTensor {
                name: format!("{name}.nested_quant_map"),
                dtype: Dtype::F32,
                shape: vec![256],
                bytes: f32_bytes(&dynamic_map()),
            });
            json.nested_blocksize = Some(NESTED_BLOCK_SIZE);
            json.nested_dtype = Some("float32".into());
            json.nested_offset = Some(f64::from(nested.offset));
        }
    }
    let json = serde_json::to_vec(&json)?;
    tensors.push(OwnedTensor {
        name: format!(
            "{name}.quant_state.bitsandbytes__{}",
            state.quant_type.name()
        ),
        dtype: Dtype::U8,
        shape: vec![json.len()],
        bytes: json,
    });
    Ok(tensors)
}

/// Reads the quantized weight `name` from a bitsandbytes checkpoint.
pub fn from_tensors(tensors: &SafeTensors, name: &str) -> Result<QuantState, QuantError> {
    let (json_name, quant_type) = [QuantType::Nf4, QuantType::Fp4]
        .into_iter()
        .map(|t| (format!("{name}.quant_state.bitsandbytes__{}", t.name()), t))
        .find(|(key, _)| tensors.tensor(key).is_ok())
        .ok_or_else(|| format_error(name, "no quant_state.bitsandbytes__nf4 or __fp4 tensor"))?;
    let json: PackedQuantState =
        serde_json::from_slice(read(tensors, &json_name, Dtype::U8)?.data())
            .map_err(|err| format_error(&json_name, &err.to_string()))?;
    if QuantType::from_name(&json.quant_type) != Some(quant_type) {
        return Err(format_error(
            &json_name,
            &format!("quant_type {:?}", json.quant_type),
        ));
    }
    check_code(
        tensors,
        &format!("{name}.quant_map"),
        quant_type.code(),
        "quant_map",
    )?;
    let packed = read(tensors, name, Dtype::U8)?.data().to_vec();
    let absmax_name = format!("{name}.absmax");
    let absmax = match json.nested_offset {
        None => Absmax::Plain(read_f32(tensors, &absmax_name)?),
        Some(offset) => {
            if json.nested_blocksize != Some(NESTED_BLOCK_SIZE) {
                return Err(format_error(
                    &json_name,
                    &format!(
                        "nested_blocksize {:?}, only 256 is supported",
                        json.nested_blocksize
                    ),
                ));
            }
            check_code(
                tensors,
                &format!("{name}.nested_quant_map"),
                &dynamic_map(),
                "nested_quant_map",
            )?;
            Absmax::Double(NestedAbsmax {
                codes: read(tensors, &absmax_name, Dtype::U8)?.data().to_vec(),
                nested_absmax: read_f32(tensors, &format!("{name}.nested_absmax"))?,
                offset: offset as f32,
            })
        }
    };
    let state = QuantState {
        quant_type,
        block_size: json.blocksize,
        shape: json.shape,
        dtype: dtype_from_name(&json.dtype)
            .ok_or_else(|| format_error(&json_name, &format!("dtype {:?}", json.dtype)))?,
        packed,
        absmax,
    };
    state.validate()?;
    Ok(state)
}

/// The bytes of a safetensors file holding quantized weights, as transformers writes them.
pub fn serialize(weights: &[(&str, &QuantState)]) -> Result<Vec<u8>, QuantError> {
    let mut owned = Vec::new();
    for (name, state) in weights {
        owned.extend(to_tensors(name, state)?);
    }
    let views = owned
        .iter()
        .map(|t| {
            Ok((
                t.name.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.bytes)?,
            ))
        })
        .collect::<Result<Vec<_>, QuantError>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    Ok(safetensors::serialize(views, Some(metadata))?)
}

/// Reads every named quantized weight from a safetensors file.
pub fn load(path: &Path, names: &[&str]) -> Result<Vec<QuantState>, QuantError> {
    let bytes = std::fs::read(path)
        .map_err(|err| format_error(&path.display().to_string(), &err.to_string()))?;
    let tensors = SafeTensors::deserialize(&bytes)?;
    names
        .iter()
        .map(|name| from_tensors(&tensors, name))
        .collect()
}

fn read<'a>(
    tensors: &'a SafeTensors,
    name: &str,
    dtype: Dtype,
) -> Result<TensorView<'a>, QuantError> {
    let view = tensors
        .tensor(name)
        .map_err(|_| format_error(name, "tensor missing"))?;
    if view.dtype() != dtype {
        return Err(format_error(
            name,
            &format!("dtype {:?}, expected {dtype:?}", view.dtype()),
        ));
    }
    Ok(view)
}

fn read_f32(tensors: &SafeTensors, name: &str) -> Result<Vec<f32>, QuantError> {
    Ok(read(tensors, name, Dtype::F32)?
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn check_code(
    tensors: &SafeTensors,
    name: &str,
    expected: &[f32],
    what: &'static str,
) -> Result<(), QuantError> {
    if read_f32(tensors, name)? == expected {
        Ok(())
    } else {
        Err(QuantError::CodeBook(what))
    }
}

fn format_error(what: &str, detail: &str) -> QuantError {
    QuantError::Format {
        what: what.to_string(),
        detail: detail.to_string(),
    }
}

fn dtype_name(dtype: DType) -> Result<&'static str, QuantError> {
    match dtype {
        DType::F32 => Ok("float32"),
        DType::F16 => Ok("float16"),
        DType::BF16 => Ok("bfloat16"),
        other => Err(QuantError::Dtype(other)),
    }
}

fn dtype_from_name(name: &str) -> Option<DType> {
    match name {
        "float32" => Some(DType::F32),
        "float16" => Some(DType::F16),
        "bfloat16" => Some(DType::BF16),
        _ => None,
    }
}
