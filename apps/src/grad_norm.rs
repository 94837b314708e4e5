//! Gradient clipping by the global norm of all gradients, as torch's `clip_grad_norm_` (and so
//! PEFT, the HF Trainer and torchtune) do. Burn's own `GradientClipping::Norm` clips each
//! tensor by its own norm, which changes the update's direction.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Tensor};

/// Scales `grads` (of `module`'s parameters) so that their global L2 norm is at most
/// `max_norm`; returns the norm before clipping.
pub fn clip_grad_norm<M: Module>(module: &M, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    let mut squares = SumOfSquares { grads, total: None };
    module.visit(&mut squares);
    let Some(total) = squares.total else {
        return 0.0;
    };
    let norm = total.sqrt().into_scalar::<f32>() as f64;
    if norm > max_norm {
        let factor = max_norm / (norm + 1e-6);
        module.visit(&mut Scale { grads, factor });
    }
    norm
}

struct SumOfSquares<'a> {
    grads: &'a GradientsParams,
    total: Option<Tensor<1>>,
}

impl ModuleVisitor for SumOfSquares<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some(grad) = self.grads.get::<D>(param.id) else {
            return;
        };
        let squares = grad.cast(DType::F32).powi_scalar(2).sum();
        self.total = Some(match self.total.take() {
            Some(total) => total + squares,
            None => squares,
        });
    }
}

struct Scale<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl ModuleVisitor for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.remove::<D>(param.id) {
            self.grads.register(param.id, grad.mul_scalar(self.factor));
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::{Device, Distribution, Tensor};

    use super::*;

    fn global_norm(model: &Linear, grads: &GradientsParams) -> f64 {
        let weight = grads.get::<2>(model.weight.id).unwrap();
        let bias = grads.get::<1>(model.bias.as_ref().unwrap().id).unwrap();
        let squares = weight.powi_scalar(2).sum() + bias.powi_scalar(2).sum();
        squares.sqrt().into_scalar::<f32>() as f64
    }

    /// Clipping keeps every gradient's direction and scales all by one factor, to the norm.
    #[test]
    fn clips_by_the_global_norm() {
        let device = Device::flex().autodiff();
        let model: Linear = LinearConfig::new(6, 4).init(&device);
        let input = Tensor::<2>::random([3, 6], Distribution::Normal(0.0, 10.0), &device);
        let loss = model.forward(input).powi_scalar(2).sum();
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
        let weight_before = grads.get::<2>(model.weight.id).unwrap();
        let norm_before = global_norm(&model, &grads);
        assert!(norm_before > 1.0, "the test needs a large gradient");

        let reported = clip_grad_norm(&model, &mut grads, 1.0);
        assert!((reported - norm_before).abs() <= 1e-4 * norm_before);
        let norm_after = global_norm(&model, &grads);
        assert!(
            (norm_after - 1.0).abs() < 1e-4,
            "norm after clipping {norm_after}"
        );
        let weight_after = grads.get::<2>(model.weight.id).unwrap();
        let expected = weight_before.mul_scalar(1.0 / norm_before);
        let error = (weight_after - expected).abs().max().into_scalar::<f32>();
        assert!(error < 1e-5, "one factor for every tensor: {error}");

        // Below the limit nothing changes.
        let before = global_norm(&model, &grads);
        clip_grad_norm(&model, &mut grads, 10.0);
        assert_eq!(global_norm(&model, &grads), before);
    }
}
