//! Adapter-only save and load for any Burn model: its [`LoraLinear`](crate::LoraLinear)s are
//! found by module path (`layers.0.self_attn.q_proj`), so a model that names its modules as
//! Hugging Face does exchanges adapters with peft unchanged.

use std::collections::{BTreeMap, BTreeSet};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::Tensor;

use crate::peft::tensor_name;
use crate::{AdapterError, PeftAdapter, PeftConfig};

const LORA_A: &str = "lora_a";
const LORA_B: &str = "lora_b";

impl PeftAdapter {
    /// The adapters of every `LoraLinear` in `model`, in PEFT's layout, with `config` (which
    /// must be the one the model's adapters were built with).
    pub fn from_model<M: Module>(model: &M, config: PeftConfig) -> Self {
        let mut collector = Collector::default();
        model.visit(&mut collector);
        let weights = collector
            .found
            .into_iter()
            .filter_map(|(module, (lora_a, lora_b))| {
                Some((module, (lora_a?.transpose(), lora_b?.transpose())))
            })
            .collect();
        Self { config, weights }
    }

    /// `model` with this adapter's weights in its `LoraLinear`s. Every adapter of the model must
    /// be in the file and every tensor of the file must fit a module of the model; otherwise the
    /// error names the tensor. Build the model with [`PeftAdapter::lora_config`], so its scaling
    /// is this adapter's.
    pub fn load_into<M: Module>(&self, model: M) -> Result<M, AdapterError> {
        let mut collector = Collector::default();
        model.visit(&mut collector);
        let in_model: BTreeSet<&String> = collector.found.keys().collect();
        if let Some(module) = self.weights.keys().find(|m| !in_model.contains(m)) {
            return Err(AdapterError::Unexpected {
                tensor: tensor_name(module, "lora_A"),
            });
        }
        if let Some(module) = in_model.iter().find(|m| !self.weights.contains_key(**m)) {
            return Err(AdapterError::Missing {
                tensor: tensor_name(module, "lora_A"),
            });
        }
        let mut loader = Loader {
            adapter: self,
            path: Path::default(),
            error: None,
        };
        let model = model.map(&mut loader);
        match loader.error {
            Some(error) => Err(error),
            None => Ok(model),
        }
    }
}

/// Module path segments; enum variants (`Projection::Lora`) are not part of the path.
#[derive(Default)]
struct Path(Vec<Option<String>>);

impl Path {
    fn enter(&mut self, name: &str, container_type: &str) {
        let is_variant = container_type.starts_with("Enum:");
        self.0.push((!is_variant).then(|| name.to_string()));
    }

    fn exit(&mut self) {
        self.0.pop();
    }

    /// The module path and which matrix, when the current parameter is `<module>.lora_?.weight`.
    fn adapter_param(&self) -> Option<(String, &'static str)> {
        let names: Vec<&str> = self.0.iter().flatten().map(String::as_str).collect();
        let [module @ .., matrix, "weight"] = names.as_slice() else {
            return None;
        };
        let matrix = match *matrix {
            LORA_A => LORA_A,
            LORA_B => LORA_B,
            _ => return None,
        };
        Some((module.join("."), matrix))
    }
}

type Pair = (Option<Tensor<2>>, Option<Tensor<2>>);

#[derive(Default)]
struct Collector {
    path: Path,
    /// Burn-layout A (`[in, r]`) and B (`[r, out]`) per module path.
    found: BTreeMap<String, Pair>,
}

impl ModuleVisitor for Collector {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some((module, matrix)) = self.path.adapter_param() else {
            return;
        };
        let Ok([rows, cols]) = <[usize; 2]>::try_from(param.shape().to_vec()) else {
            return;
        };
        let weight = param.val().reshape([rows, cols]);
        let pair = self.found.entry(module).or_default();
        match matrix {
            LORA_A => pair.0 = Some(weight),
            _ => pair.1 = Some(weight),
        }
    }
}

struct Loader<'a> {
    adapter: &'a PeftAdapter,
    path: Path,
    error: Option<AdapterError>,
}

impl ModuleMapper for Loader<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some((module, matrix)) = self.path.adapter_param() else {
            return param;
        };
        let Some((lora_a, lora_b)) = self.adapter.weights.get(&module) else {
            return param;
        };
        let (name, torch) = match matrix {
            LORA_A => (tensor_name(&module, "lora_A"), lora_a),
            _ => (tensor_name(&module, "lora_B"), lora_b),
        };
        // PEFT keeps `[out, in]`; Burn's Linear keeps `[in, out]`.
        let expected = param.shape().to_vec();
        let [out_features, in_features] = torch.dims();
        if expected != [in_features, out_features] {
            self.error.get_or_insert(AdapterError::Shape {
                tensor: name,
                expected: expected.iter().rev().copied().collect(),
                actual: vec![out_features, in_features],
            });
            return param;
        }
        let value = torch.clone().transpose();
        param.map(|old| {
            let value = value
                .to_device(&old.device())
                .cast(old.dtype())
                .reshape(old.shape());
            value.set_require_grad(old.is_require_grad())
        })
    }
}
