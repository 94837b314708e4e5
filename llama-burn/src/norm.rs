use burn::module::{Module, Param};
use burn::tensor::{DType, Tensor};

use crate::reduce::sum_last_dim;

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
        let dtype = x.dtype();
        let x = x.cast(DType::F32);
        let width = x.dims()[2] as f64;
        let rms = sum_last_dim(x.clone().powi_scalar(2))
            .div_scalar(width)
            .add_scalar(self.eps)
            .sqrt();
        let normed = (x / rms).cast(dtype);
        normed * self.weight.val().unsqueeze()
    }
}
