use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Initializer, Linear, LinearConfig};
use burn::tensor::{DType, Tensor};
use kernels_cubecl::{KeptAdapter, QuantError, low_rank_down, low_rank_up_add};
use serde::{Deserialize, Serialize};

use crate::{FrozenLinear, KeptHidden, MergeError};

/// Which biases train beside the adapters, as PEFT's `bias` option.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraBias {
    /// None: every base stays frozen whole (the default, and QLoRA's).
    #[default]
    None,
    /// The biases of every projection, adapted or not.
    All,
    /// The biases of the adapted projections.
    LoraOnly,
}

/// A LoRA adapter's hyper-parameters, as PEFT names them.
#[derive(Config, Debug, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` of the update `B·A`.
    pub rank: usize,
    /// `lora_alpha`: the scaling is `alpha / rank` (`alpha / sqrt(rank)` with rsLoRA). Default 16.
    #[config(default = 16.0)]
    pub alpha: f64,
    /// A direct scaling that replaces `alpha / rank` when set (the QLoRA-LLM seed uses 1.0).
    /// Default: none.
    #[config(default = "None")]
    pub scaling: Option<f64>,
    /// rsLoRA: scale by `alpha / sqrt(rank)`. Default false.
    #[config(default = false)]
    pub use_rslora: bool,
    /// Dropout on the adapter's input during training. Default 0.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Which biases train: `none`, `all` or `lora_only`. Default none.
    #[config(default = "LoraBias::None")]
    pub bias: LoraBias,
}

impl LoraConfig {
    /// The factor the adapter's output is multiplied by.
    pub fn scaling(&self) -> f64 {
        match self.scaling {
            Some(scaling) => scaling,
            None if self.use_rslora => self.alpha / (self.rank as f64).sqrt(),
            None => self.alpha / self.rank as f64,
        }
    }

    /// Wraps `base`, frozen, with a new adapter initialised as PEFT does: A Kaiming-uniform,
    /// B zero, so the layer starts out equal to its base. The adapter is made on the base's
    /// device; a 4-bit base lives outside autodiff, so wrap the dense layer and pack the base
    /// afterwards (as [`crate::QloraConfig::apply`] does), or call `Module::train` before training.
    pub fn init(&self, base: impl Into<FrozenLinear>) -> LoraLinear {
        let base = base.into();
        let [d_input, d_output] = base.dims();
        let device = base.device();
        let lora_a = LinearConfig::new(d_input, self.rank)
            .with_bias(false)
            .with_initializer(Initializer::KaimingUniform {
                gain: 1.0 / 3f64.sqrt(),
                fan_out_only: false,
            })
            .init(&device);
        let lora_b = LinearConfig::new(self.rank, d_output)
            .with_bias(false)
            .with_initializer(Initializer::Zeros)
            .init(&device);
        self.with_adapter(base, lora_a, lora_b)
    }

    /// Wraps `base`, frozen, with the given adapter (A: `d_input -> rank`, B: `rank -> d_output`).
    pub fn with_adapter(
        &self,
        base: impl Into<FrozenLinear>,
        lora_a: Linear,
        lora_b: Linear,
    ) -> LoraLinear {
        let base = match self.bias {
            LoraBias::None => base.into(),
            LoraBias::All | LoraBias::LoraOnly => base.into().with_trainable_bias(),
        };
        LoraLinear {
            base,
            lora_a,
            lora_b,
            dropout: DropoutConfig::new(self.dropout).init(),
            scaling: self.scaling(),
            merged: false,
            kept_hidden: None,
        }
    }
}

/// A linear layer with a low-rank adapter: `y = base(x) + scaling * B(A(dropout(x)))`.
///
/// The update is applied to activations, never as a dense `B·A` matrix, so the adapter costs
/// `rank * (d_input + d_output)` multiply-adds a token. The base (dense or 4-bit) is frozen.
#[derive(Module, Debug)]
pub struct LoraLinear {
    pub base: FrozenLinear,
    pub lora_a: Linear,
    pub lora_b: Linear,
    pub dropout: Dropout,
    pub scaling: f64,
    /// Whether the update is folded into a dense base (see [`LoraLinear::merge`]).
    pub merged: bool,
    /// In a checkpointed layer's two copies ([`LoraLinear::with_kept_hidden`]): where the
    /// adapter's hidden and cast go from the forward without a graph to the recomputation.
    #[module(skip)]
    pub kept_hidden: Option<KeptHidden>,
}

impl LoraLinear {
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        if self.merged {
            return self.base.forward(input);
        }
        // The adapter's weights keep their own dtype (f32 master weights over a bf16 model, as
        // PEFT keeps them) and are cast to the input's for the products, as torch's autocast
        // does: casting two rank-r matrices is free, casting the activations would copy every
        // input in f32 and keep that copy for the backward. The scaling goes into B likewise.
        // The products take the low-rank kernels: Burn's matmul tiles a rank-wide side badly.
        // Over a 4-bit base without dropout (none configured, or evaluation: Burn's `Dropout`
        // passes its input through unless training on an autodiff device) the whole layer is
        // one operation each way.
        if let FrozenLinear::Packed(base) = &self.base
            && !self.dropout_active(&input)
        {
            let (lora_a, lora_b) = (self.lora_a.weight.val(), self.lora_b.weight.val());
            if let Some(KeptHidden::Keep(slot)) = &self.kept_hidden {
                let (output, kept) = base.forward_keeping(input, lora_a, lora_b, self.scaling);
                slot.put(kept);
                return output;
            }
            let kept = self.taken();
            return base.forward_with_adapter(input, lora_a, lora_b, self.scaling, kept);
        }
        let lora_b = self.lora_b.weight.val().mul_scalar(self.scaling);
        let hidden = low_rank_down(
            self.dropout.forward(input.clone()),
            self.lora_a.weight.val(),
        );
        low_rank_up_add(self.base.forward(input), hidden, lora_b)
    }

    /// Zeros in `grad`'s shape whose backward gives the layer's gradients (of the input and the
    /// adapter) for the output gradient `grad`, as `(self.forward(input) * grad).backward()`
    /// would, for a backward that never reads the output: activation checkpointing recomputes a
    /// block's last projection only for its gradients. Over a 4-bit base without dropout the
    /// base's product is never computed; elsewhere the output is, then taken from itself.
    pub fn pullback<const D: usize>(&self, input: Tensor<D>, grad: Tensor<D>) -> Tensor<D> {
        if !self.merged
            && let FrozenLinear::Packed(base) = &self.base
            && !self.dropout_active(&input)
        {
            return base.pullback_with_adapter(
                input,
                self.lora_a.weight.val(),
                self.lora_b.weight.val(),
                self.scaling,
                grad,
                self.taken(),
            );
        }
        pullback_through(self.forward(input), grad)
    }

    /// Two copies of the layer (the adapter's parameters shared) for activation checkpointing:
    /// the first, for the forward without a graph, keeps the adapter's hidden and cast; the
    /// second, for the recomputation over the same input, takes them instead of computing them.
    /// Over a 4-bit base without dropout; elsewhere both compute as the layer does.
    pub fn with_kept_hidden(&self) -> (Self, Self) {
        let (keep, take) = KeptHidden::pair();
        let copy = |kept_hidden| Self {
            kept_hidden: Some(kept_hidden),
            ..self.clone()
        };
        (copy(keep), copy(take))
    }

    /// What a recomputation's copy finds kept, if any.
    fn taken(&self) -> Option<KeptAdapter> {
        match &self.kept_hidden {
            Some(KeptHidden::Take(slot)) => slot.take(),
            _ => None,
        }
    }

    /// Whether dropout changes `input`: configured, training, on an autodiff device (Burn's
    /// `Dropout` passes its input through otherwise).
    fn dropout_active<const D: usize>(&self, input: &Tensor<D>) -> bool {
        self.dropout.prob > 0.0
            && self.dropout.training.is_enabled()
            && input.device().is_autodiff()
    }

    /// The same layer (the adapter's parameters shared), its 4-bit base carrying its
    /// dequantized copy in `dtype` (see [`Linear4bit::with_dense_copy`]).
    pub fn with_dense_copy(&self, dtype: DType) -> Result<Self, QuantError> {
        Ok(Self {
            base: self.base.with_dense_copy(dtype)?,
            ..self.clone()
        })
    }

    /// `scaling * B·A` in Burn's `[d_input, d_output]` layout, f32.
    pub fn delta_weight(&self) -> Tensor<2> {
        let lora_a = self.lora_a.weight.val().cast(DType::F32);
        let lora_b = self.lora_b.weight.val().cast(DType::F32);
        lora_a.matmul(lora_b).mul_scalar(self.scaling)
    }

    /// The merged dense layer `dequantize(base) + scaling * B·A`, computed in f32 and written in
    /// `dtype`. A 4-bit base is dequantized, never re-quantized: re-quantizing the sum would
    /// change the model's outputs.
    pub fn to_merged_linear(&self, dtype: DType) -> Result<Linear, MergeError> {
        let mut dense = self.base.to_dense(DType::F32)?;
        if !self.merged {
            let delta = self.delta_weight();
            dense.weight = dense.weight.map(|weight| weight + delta);
        }
        dense.weight = dense.weight.map(|weight| weight.cast(dtype));
        Ok(dense)
    }

    /// Folds the update into a dense base, so the forward costs one matmul; [`Self::unmerge`]
    /// takes it out again. A 4-bit base is refused: use [`Self::to_merged_linear`].
    pub fn merge(self) -> Result<Self, MergeError> {
        if self.merged {
            return Err(MergeError::AlreadyMerged);
        }
        self.fold(1.0, true)
    }

    /// Takes a merged update back out of the dense base.
    pub fn unmerge(self) -> Result<Self, MergeError> {
        if !self.merged {
            return Err(MergeError::NotMerged);
        }
        self.fold(-1.0, false)
    }

    fn fold(mut self, sign: f64, merged: bool) -> Result<Self, MergeError> {
        let delta = self.delta_weight().mul_scalar(sign);
        let FrozenLinear::Dense(base) = self.base else {
            return Err(MergeError::PackedBase);
        };
        let weight = base.weight.map(|weight| {
            let dtype = weight.dtype();
            (weight.cast(DType::F32) + delta).cast(dtype)
        });
        self.base = FrozenLinear::Dense(Linear {
            weight,
            bias: base.bias,
        });
        self.merged = merged;
        Ok(self)
    }
}

/// A bias-free linear layer from a weight in torch's `[d_output, d_input]` layout (Burn keeps
/// `[d_input, d_output]`).
pub fn linear_from_torch(weight: Tensor<2>) -> Linear {
    Linear {
        weight: Param::from_tensor(weight.transpose()),
        bias: None,
    }
}

/// `output · grad − stop_gradient(output · grad)`: zeros whose backward (from ones) sends `grad`
/// into `output`'s graph, the pullback of a layer whose output is computed anyway.
pub(crate) fn pullback_through<const D: usize>(output: Tensor<D>, grad: Tensor<D>) -> Tensor<D> {
    let product = output * grad;
    product.clone() - product.detach()
}
