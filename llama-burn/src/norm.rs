use burn::module::{Module, Param};
use burn::tensor::Tensor;
use burn_qlora::kernels::{rms_norm, rms_norm_passing};

/// Root-mean-square layer norm, computed in f32 whatever the model's dtype, as transformers does.
#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor<1>, eps: f64) -> Self {
        Self {
            weight: Param::from_tensor(weight).set_require_grad(false),
            eps,
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        rms_norm(x, self.weight.val(), self.eps)
    }

    /// [`Self::forward`] whose backward also gives `x` the gradient `passed` (`x`'s shape), as a
    /// residual connection from `x` to the output `passed` is the gradient of would: inside the
    /// norm's backward kernel (see `rms_norm_passing`).
    pub fn forward_passing(&self, x: Tensor<3>, passed: Tensor<3>) -> Tensor<3> {
        rms_norm_passing(x, self.weight.val(), passed, self.eps)
    }
}
