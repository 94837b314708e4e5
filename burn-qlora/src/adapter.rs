//! Adapter-only save and load for any Burn model: its [`LoraLinear`](crate::LoraLinear)s, and the
//! biases that train beside them, are found by module path (`layers.0.self_attn.q_proj`), so a
//! model that names its modules as Hugging Face does exchanges adapters with peft unchanged.

use std::collections::{BTreeMap, BTreeSet};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamGroup, ParamId};
use burn::tensor::Tensor;

use crate::peft::{PREFIX, tensor_name};
use crate::{AdapterError, LoraBias, PeftAdapter, PeftConfig};

const LORA_A: &str = "lora_a";
const LORA_B: &str = "lora_b";

impl PeftAdapter {
    /// The adapters of every `LoraLinear` in `model`, in PEFT's layout, with `config` (which
    /// must be the one the model's adapters were built with), and the biases its `bias` trains.
    pub fn from_model<M: Module>(model: &M, config: PeftConfig) -> Self {
        let mut collector = Collector {
            bias: config.bias,
            ..Collector::default()
        };
        model.visit(&mut collector);
        let weights = collector
            .found
            .into_iter()
            .filter_map(|(module, (lora_a, lora_b))| {
                Some((module, (lora_a?.transpose(), lora_b?.transpose())))
            })
            .collect();
        Self {
            config,
            weights,
            biases: collector.trained_biases,
        }
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
        if let Some(name) = self
            .biases
            .keys()
            .find(|name| !collector.biases.contains(*name))
        {
            return Err(AdapterError::Unexpected {
                tensor: format!("{PREFIX}{name}"),
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

/// The parameters that train in `model`: every `LoraLinear`'s A and B, and the biases `bias`
/// says train. A training loop's checkpoints need only these (`Module::into_record_group`).
pub fn trainable_params<M: Module>(model: &M, bias: LoraBias) -> ParamGroup {
    let mut collector = Collector {
        bias,
        ..Collector::default()
    };
    model.visit(&mut collector);
    ParamGroup::from_ids(collector.trainable)
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

    fn names(&self) -> Vec<&str> {
        self.0.iter().flatten().map(String::as_str).collect()
    }

    /// The module path and which matrix, when the current parameter is `<module>.lora_?.weight`.
    fn adapter_param(&self) -> Option<(String, &'static str)> {
        let names = self.names();
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

    /// PEFT's name for the current parameter when it is a bias: `<path>.base_layer.bias` for the
    /// base of an adapted projection (ours is `<path>.base.bias`), `<path>.bias` otherwise.
    fn bias_name(&self) -> Option<String> {
        match self.names().as_slice() {
            [module @ .., "base", "bias"] => Some(format!("{}.base_layer.bias", module.join("."))),
            [module @ .., "bias"] => Some(format!("{}.bias", module.join("."))),
            _ => None,
        }
    }
}

type Pair = (Option<Tensor<2>>, Option<Tensor<2>>);

#[derive(Default)]
struct Collector {
    path: Path,
    /// Burn-layout A (`[in, r]`) and B (`[r, out]`) per module path.
    found: BTreeMap<String, Pair>,
    /// PEFT's names of all the model's biases, and the values of those `bias` says train.
    biases: BTreeSet<String>,
    bias: LoraBias,
    trained_biases: BTreeMap<String, Tensor<1>>,
    /// The ids of the adapter matrices and trained biases.
    trainable: Vec<ParamId>,
}

impl ModuleVisitor for Collector {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(name) = self.path.bias_name() {
            let trains = match self.bias {
                LoraBias::None => false,
                LoraBias::LoraOnly => name.ends_with(".base_layer.bias"),
                LoraBias::All => true,
            };
            if trains {
                let bias = param.val().reshape([param.shape().num_elements()]);
                self.trained_biases.insert(name.clone(), bias);
                self.trainable.push(param.id);
            }
            self.biases.insert(name);
            return;
        }
        let Some((module, matrix)) = self.path.adapter_param() else {
            return;
        };
        let Ok([rows, cols]) = <[usize; 2]>::try_from(param.shape().to_vec()) else {
            return;
        };
        self.trainable.push(param.id);
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
        if let Some(name) = self.path.bias_name() {
            return match self.adapter.biases.get(&name) {
                Some(bias) => self.replace(param, &format!("{PREFIX}{name}"), bias.clone()),
                None => param,
            };
        }
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
        self.replace(param, &name, torch.clone().transpose())
    }
}

impl Loader<'_> {
    /// `param` with `value`'s numbers, on its device, in its dtype, trainable as it was.
    fn replace<const D: usize, const V: usize>(
        &mut self,
        param: Param<Tensor<D>>,
        name: &str,
        value: Tensor<V>,
    ) -> Param<Tensor<D>> {
        let expected = param.shape().to_vec();
        if value.shape().num_elements() != param.shape().num_elements() {
            self.error.get_or_insert(AdapterError::Shape {
                tensor: name.to_string(),
                expected,
                actual: value.dims().to_vec(),
            });
            return param;
        }
        param.map(|old| {
            let value = value
                .to_device(&old.device())
                .cast(old.dtype())
                .reshape(old.shape());
            value.set_require_grad(old.is_require_grad())
        })
    }
}
