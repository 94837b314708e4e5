use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{DType, Tensor};
use kernels_cubecl::{
    KeptAdapter, Packed4bit, QuantConfig, QuantError, lora_4bit_linear, lora_4bit_linear_keeping,
    lora_4bit_pullback,
};

use crate::lora::pullback_through;

/// A frozen linear layer whose weight stays packed in 4 bits (NF4 or FP4), bitsandbytes'
/// `Linear4bit`. The forward dequantizes the weight for the product and drops it after; the
/// backward dequantizes it again, so the dense weight is never kept alive for backward (but
/// in a copy made by [`Linear4bit::with_dense_copy`]). Gradients reach the input only.
#[derive(Module, Debug)]
pub struct Linear4bit {
    /// The weight in torch's `[d_output, d_input]` layout, as bitsandbytes packs it.
    #[module(skip)]
    pub weight: Packed4bit,
    /// The bias, frozen.
    pub bias: Option<Param<Tensor<1>>>,
}

impl Linear4bit {
    /// Quantizes a dense layer (Burn's `[d_input, d_output]` weight); the dense weight is
    /// dropped once packed. The bias is kept as it was, trainable or not.
    pub fn quantize(linear: Linear, config: QuantConfig) -> Result<Self, QuantError> {
        let weight = Packed4bit::quantize(linear.weight.val().transpose(), config)?;
        Ok(Self {
            weight,
            bias: linear.bias,
        })
    }

    /// `[d_input, d_output]`.
    pub fn dims(&self) -> [usize; 2] {
        [self.weight.shape[1], self.weight.shape[0]]
    }

    /// `input · Wᵀ + bias`, in `input`'s dtype.
    ///
    /// # Panics
    ///
    /// If `input` does not end in `d_input` features or is on another device, like `nn::Linear`.
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        let output = self
            .weight
            .linear(input)
            .unwrap_or_else(|err| panic!("4-bit linear: {err}"));
        self.add_bias(output)
    }

    /// `input · Wᵀ + (input · lora_a) · (scaling · lora_b) + bias`: the layer with a LoRA
    /// adapter in Burn's layout (`lora_a` `[d_input, r]`, `lora_b` `[r, d_output]`), as one
    /// operation each way. `kept`, where given, is what [`Self::forward_keeping`] kept for
    /// this input, taken instead of computed.
    ///
    /// # Panics
    ///
    /// As [`Self::forward`], and if the adapter or what was kept does not fit the layer.
    pub fn forward_with_adapter<const D: usize>(
        &self,
        input: Tensor<D>,
        lora_a: Tensor<2>,
        lora_b: Tensor<2>,
        scaling: f64,
        kept: Option<KeptAdapter>,
    ) -> Tensor<D> {
        let output = lora_4bit_linear(input, &self.weight, lora_a, lora_b, scaling, kept)
            .unwrap_or_else(|err| panic!("4-bit LoRA linear: {err}"));
        self.add_bias(output)
    }

    /// [`Self::forward_with_adapter`] without a graph, and what a recomputation over the same
    /// input can take instead of computing (the adapter's hidden and cast).
    ///
    /// # Panics
    ///
    /// As [`Self::forward_with_adapter`].
    pub fn forward_keeping<const D: usize>(
        &self,
        input: Tensor<D>,
        lora_a: Tensor<2>,
        lora_b: Tensor<2>,
        scaling: f64,
    ) -> (Tensor<D>, KeptAdapter) {
        let (output, kept) = lora_4bit_linear_keeping(input, &self.weight, lora_a, lora_b, scaling)
            .unwrap_or_else(|err| panic!("4-bit LoRA linear: {err}"));
        (self.add_bias(output).detach(), kept)
    }

    /// [`Self::forward_with_adapter`]'s pullback for the output gradient `grad` (see
    /// [`crate::LoraLinear::pullback`]): the base's product is never computed; `kept` as for
    /// [`Self::forward_with_adapter`].
    ///
    /// # Panics
    ///
    /// As [`Self::forward_with_adapter`], and if `grad` is not the output's shape and dtype.
    pub fn pullback_with_adapter<const D: usize>(
        &self,
        input: Tensor<D>,
        lora_a: Tensor<2>,
        lora_b: Tensor<2>,
        scaling: f64,
        grad: Tensor<D>,
        kept: Option<KeptAdapter>,
    ) -> Tensor<D> {
        let zeros = lora_4bit_pullback(
            input,
            &self.weight,
            lora_a,
            lora_b,
            scaling,
            grad.clone(),
            kept,
        )
        .unwrap_or_else(|err| panic!("4-bit LoRA pullback: {err}"));
        // A trainable bias's gradient is the rows' sum of `grad`.
        match self.bias_in(grad.dtype()) {
            Some(bias) => zeros + pullback_through(bias, grad),
            None => zeros,
        }
    }

    fn add_bias<const D: usize>(&self, output: Tensor<D>) -> Tensor<D> {
        match self.bias_in(output.dtype()) {
            Some(bias) => output + bias,
            None => output,
        }
    }

    /// The bias in `dtype`, broadcastable over an output of rank `D`.
    fn bias_in<const D: usize>(&self, dtype: DType) -> Option<Tensor<D>> {
        let bias = self.bias.as_ref()?;
        Some(bias.val().cast(dtype).unsqueeze())
    }

    /// The same layer with its weight's dequantized copy in `dtype` kept beside the packed one
    /// (see [`Packed4bit::with_dense_copy`]): the same numbers, one dequantization for the
    /// products of a checkpointed layer's recomputation and backward instead of one each.
    pub fn with_dense_copy(&self, dtype: DType) -> Result<Self, QuantError> {
        Ok(Self {
            weight: self.weight.with_dense_copy(dtype)?,
            bias: self.bias.clone(),
        })
    }

    /// The layer with its weight dequantized to `dtype` (f32, f16 or bf16), Burn's layout.
    pub fn dequantize(&self, dtype: DType) -> Result<Linear, QuantError> {
        let weight = self.weight.dequantize_to::<2>(dtype)?.transpose();
        Ok(Linear {
            weight: Param::from_tensor(weight).set_require_grad(false),
            bias: self.bias.clone(),
        })
    }
}
