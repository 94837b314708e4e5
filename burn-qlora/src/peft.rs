//! PEFT interchange: `adapter_config.json` + `adapter_model.safetensors`, with tensors named
//! `base_model.model.<module path>.lora_A.weight` (`[r, in]`) and `.lora_B.weight` (`[out, r]`),
//! so adapters trained here load in peft, vLLM and transformers, and theirs load here.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{DType, Device, Tensor, TensorData};
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use crate::{AdapterError, FrozenLinear, LoraBias, LoraConfig, LoraLinear, linear_from_torch};

const CONFIG_FILE: &str = "adapter_config.json";
const WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub(crate) const PREFIX: &str = "base_model.model.";

/// The keys of `adapter_config.json` this crate reads and writes; peft's other keys are
/// ignored on import and written with peft's defaults on export.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeftConfig {
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub use_rslora: bool,
    pub target_modules: Vec<String>,
    /// Which biases were trained: `none`, `all` or `lora_only`.
    #[serde(default)]
    pub bias: LoraBias,
    /// The base model the adapter was trained on, where peft looks for it.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
}

/// A LoRA adapter in PEFT's form: its config and, for each adapted module path, the torch-layout
/// `lora_A` (`[r, in]`) and `lora_B` (`[out, r]`) weights; and the trained biases, if the config's
/// `bias` trains any, under PEFT's names (`<path>.base_layer.bias` for an adapted projection,
/// `<path>.bias` for another).
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    pub config: PeftConfig,
    pub weights: BTreeMap<String, (Tensor<2>, Tensor<2>)>,
    pub biases: BTreeMap<String, Tensor<1>>,
}

impl PeftConfig {
    /// The PEFT config of adapters built with `lora` on `target_modules`. A direct scaling `s`
    /// becomes `lora_alpha = s * r`, which PEFT reads as the same scaling.
    pub fn from_lora(lora: &LoraConfig, target_modules: Vec<String>) -> Self {
        let (lora_alpha, use_rslora) = match lora.scaling {
            Some(scaling) => (scaling * lora.rank as f64, false),
            None => (lora.alpha, lora.use_rslora),
        };
        Self {
            r: lora.rank,
            lora_alpha,
            lora_dropout: lora.dropout,
            use_rslora,
            target_modules,
            bias: lora.bias,
            base_model_name_or_path: None,
        }
    }

    /// The same config naming the base model (a Hub id or a path).
    pub fn with_base_model(self, base_model: impl Into<String>) -> Self {
        Self {
            base_model_name_or_path: Some(base_model.into()),
            ..self
        }
    }
}

impl PeftAdapter {
    /// The LoRA hyper-parameters this adapter was trained with.
    pub fn lora_config(&self) -> LoraConfig {
        LoraConfig::new(self.config.r)
            .with_alpha(self.config.lora_alpha)
            .with_use_rslora(self.config.use_rslora)
            .with_dropout(self.config.lora_dropout)
            .with_bias(self.config.bias)
    }

    /// Reads `adapter_config.json` and `adapter_model.safetensors` from `dir` onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, AdapterError> {
        let config_path = dir.join(CONFIG_FILE);
        let text = read(&config_path)?;
        let config: PeftConfig =
            serde_json::from_slice(&text).map_err(|source| AdapterError::Json {
                path: config_path,
                source,
            })?;
        let weights_path = dir.join(WEIGHTS_FILE);
        let bytes = read(&weights_path)?;
        let tensors =
            SafeTensors::deserialize(&bytes).map_err(|source| AdapterError::Safetensors {
                path: weights_path,
                source,
            })?;
        let (mut weights, mut biases) = (BTreeMap::new(), BTreeMap::new());
        for name in tensors.names() {
            let Some(rest) = name.strip_prefix(PREFIX) else {
                continue;
            };
            if let Some(module) = rest.strip_suffix(".lora_A.weight") {
                let lora_a = read_tensor(&tensors, name, device)?;
                let lora_b = read_tensor(&tensors, &tensor_name(module, "lora_B"), device)?;
                weights.insert(module.to_string(), (lora_a, lora_b));
            } else if rest.ends_with(".bias") {
                biases.insert(rest.to_string(), read_tensor(&tensors, name, device)?);
            }
        }
        Ok(Self {
            config,
            weights,
            biases,
        })
    }

    /// Writes the adapter to `dir` as peft does, each file atomically.
    pub fn save(&self, dir: &Path) -> Result<(), AdapterError> {
        std::fs::create_dir_all(dir).map_err(|source| AdapterError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut json = serde_json::to_value(&self.config).expect("the config serializes");
        let extra = serde_json::json!({
            "peft_type": "LORA",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "task_type": null,
        });
        json.as_object_mut()
            .expect("an object")
            .extend(extra.as_object().expect("an object").clone());
        let text = serde_json::to_vec_pretty(&json).expect("JSON serializes");
        write_atomically(&dir.join(CONFIG_FILE), &text)?;

        let mut data = Vec::new();
        for (module, (lora_a, lora_b)) in &self.weights {
            for (matrix, tensor) in [("lora_A", lora_a), ("lora_B", lora_b)] {
                data.push((tensor_name(module, matrix), f32_entry(tensor.clone())));
            }
        }
        for (name, bias) in &self.biases {
            data.push((format!("{PREFIX}{name}"), f32_entry(bias.clone())));
        }
        let views = data
            .iter()
            .map(|(name, (shape, bytes))| {
                let view = TensorView::new(Dtype::F32, shape.clone(), bytes).expect("sizes agree");
                (name.clone(), view)
            })
            .collect::<Vec<_>>();
        let path = dir.join(WEIGHTS_FILE);
        let metadata = std::collections::HashMap::from([("format".into(), "pt".into())]);
        let bytes = safetensors::serialize(views, Some(metadata)).map_err(|source| {
            AdapterError::Safetensors {
                path: path.clone(),
                source,
            }
        })?;
        write_atomically(&path, &bytes)
    }

    /// Wraps `base` (the model's linear at `module`) with this adapter's weights for it.
    pub fn apply(
        &self,
        module: &str,
        base: impl Into<FrozenLinear>,
    ) -> Result<LoraLinear, AdapterError> {
        let base = base.into();
        let (lora_a, lora_b) = self
            .weights
            .get(module)
            .ok_or_else(|| AdapterError::Missing {
                tensor: tensor_name(module, "lora_A"),
            })?;
        let [d_input, d_output] = base.dims();
        let r = self.config.r;
        check_shape(&tensor_name(module, "lora_A"), lora_a, [r, d_input])?;
        check_shape(&tensor_name(module, "lora_B"), lora_b, [d_output, r])?;
        Ok(self.lora_config().with_adapter(
            base,
            linear_from_torch(lora_a.clone()),
            linear_from_torch(lora_b.clone()),
        ))
    }

    /// The adapter of a trained layer, in PEFT's torch layout, under `module`.
    pub fn insert(&mut self, module: &str, layer: &LoraLinear) {
        self.weights.insert(
            module.to_string(),
            (
                layer.lora_a.weight.val().transpose(),
                layer.lora_b.weight.val().transpose(),
            ),
        );
    }
}

/// The shape and little-endian f32 bytes of a tensor, for safetensors.
fn f32_entry<const D: usize>(tensor: Tensor<D>) -> (Vec<usize>, Vec<u8>) {
    let shape = tensor.dims().to_vec();
    let values = tensor
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("an f32 tensor reads back as f32");
    (shape, values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// PEFT's name for a module's `lora_A` or `lora_B` weight.
pub(crate) fn tensor_name(module: &str, matrix: &str) -> String {
    format!("{PREFIX}{module}.{matrix}.weight")
}

pub(crate) fn check_shape<const D: usize>(
    name: &str,
    tensor: &Tensor<D>,
    expected: [usize; D],
) -> Result<(), AdapterError> {
    let actual = tensor.dims();
    if actual == expected {
        Ok(())
    } else {
        Err(AdapterError::Shape {
            tensor: name.to_string(),
            expected: expected.to_vec(),
            actual: actual.to_vec(),
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, AdapterError> {
    std::fs::read(path).map_err(|source| AdapterError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), AdapterError> {
    crate::write_atomically(path, bytes).map_err(|source| AdapterError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_tensor<const D: usize>(
    tensors: &SafeTensors,
    name: &str,
    device: &Device,
) -> Result<Tensor<D>, AdapterError> {
    let view = tensors.tensor(name).map_err(|_| AdapterError::Missing {
        tensor: name.to_string(),
    })?;
    let shape = view.shape().to_vec();
    if shape.len() != D {
        return Err(AdapterError::Rank {
            tensor: name.to_string(),
            expected: D,
            actual: shape,
        });
    }
    let dtype = match view.dtype() {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        other => {
            return Err(AdapterError::Dtype {
                tensor: name.to_string(),
                dtype: format!("{other:?}"),
            });
        }
    };
    // Burn converts the stored dtype to f32 on creation.
    let data = TensorData::from_bytes_vec(view.data().to_vec(), shape, dtype);
    Ok(Tensor::from_data(data, (device, DType::F32)))
}
