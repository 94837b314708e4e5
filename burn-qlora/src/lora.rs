use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Initializer, Linear, LinearConfig};
use burn::tensor::Tensor;

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
    /// B zero, so the layer starts out equal to its base.
    pub fn init(&self, base: Linear) -> LoraLinear {
        let [d_input, d_output] = base.weight.shape().dims();
        let device = base.weight.device();
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
    pub fn with_adapter(&self, base: Linear, lora_a: Linear, lora_b: Linear) -> LoraLinear {
        LoraLinear {
            base: base.no_grad(),
            lora_a,
            lora_b,
            dropout: DropoutConfig::new(self.dropout).init(),
            scaling: self.scaling(),
        }
    }
}

/// A linear layer with a low-rank adapter: `y = base(x) + scaling * B(A(dropout(x)))`.
///
/// The update is applied to activations, never as a dense `B·A` matrix, so the adapter costs
/// `rank * (d_input + d_output)` multiply-adds a token.
#[derive(Module, Debug)]
pub struct LoraLinear {
    /// The frozen base layer.
    pub base: Linear,
    pub lora_a: Linear,
    pub lora_b: Linear,
    pub dropout: Dropout,
    pub scaling: f64,
}

impl LoraLinear {
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        let adapter = self
            .lora_b
            .forward(self.lora_a.forward(self.dropout.forward(input.clone())));
        self.base.forward(input) + adapter.mul_scalar(self.scaling)
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
