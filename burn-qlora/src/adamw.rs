//! AdamW with each parameter's update as one operation ([`kernels::adamw_update`]): Burn's
//! `AdamW` arithmetic and state (its records load here and back), without its 15 tensor
//! operations a parameter, which at a 7B model's 448 adapter tensors cost the host more than the
//! device spent on them.
//!
//! [`kernels::adamw_update`]: crate::kernels::adamw_update

use burn::config::Config;
use burn::optim::{AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, ModuleOptimizer};
use burn::optim::{LearningRate, Optimizer};
use burn::tensor::{Device, Tensor};

use crate::kernels::{AdamWScalars, adamw_update, fused_adamw_supported};

/// [`FusedAdamW`]'s settings; the defaults are Burn's `AdamWConfig`'s.
#[derive(Config, Debug, PartialEq)]
pub struct FusedAdamWConfig {
    /// Decay of the first moment's running average.
    #[config(default = 0.9)]
    pub beta_1: f32,
    /// Decay of the second moment's running average.
    #[config(default = 0.999)]
    pub beta_2: f32,
    /// Added to the second moment's root, against division by zero.
    #[config(default = 1e-5)]
    pub epsilon: f32,
    /// Decoupled weight decay: each step multiplies the parameter by `1 - lr · weight_decay`.
    #[config(default = 1e-4)]
    pub weight_decay: f32,
}

impl FusedAdamWConfig {
    /// The optimizer, for the parameters of a whole module.
    pub fn init(&self) -> ModuleOptimizer {
        ModuleOptimizer::from(self.build())
    }

    pub fn build(&self) -> FusedAdamW {
        FusedAdamW {
            config: self.clone(),
            composed: AdamWConfig::new()
                .with_beta_1(self.beta_1)
                .with_beta_2(self.beta_2)
                .with_epsilon(self.epsilon)
                .with_weight_decay(self.weight_decay)
                .build(),
        }
    }
}

/// AdamW, one operation a parameter where the device has the kernel
/// ([`kernels::fused_adamw_supported`](crate::kernels::fused_adamw_supported)), else Burn's
/// `AdamW` itself.
#[derive(Clone)]
pub struct FusedAdamW {
    config: FusedAdamWConfig,
    composed: AdamW,
}

impl Optimizer for FusedAdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        // AMSGrad's state comes only from Burn's `AdamW` with it on: leave such a state to it.
        let amsgrad = state
            .as_ref()
            .is_some_and(|state| state.momentum.max_moment_2.is_some());
        if amsgrad || !fused_adamw_supported(&tensor, &grad) {
            // Burn's update writes the parameter and moments in place where nothing else holds
            // them, but a checkpoint's record may still be reading them (CubeCL reads lazily):
            // held here, they stay as they were.
            let _held = (tensor.clone(), state.clone());
            return self.composed.step(lr, tensor, grad, state);
        }
        let config = &self.config;
        // The first step's moments start from zero: the gradient stands in for the old ones,
        // multiplied by 0.
        let (time, keep, moment_1, moment_2) = match state {
            Some(state) => {
                let momentum = state.momentum;
                (momentum.time + 1, 1.0, momentum.moment_1, momentum.moment_2)
            }
            None => (1, 0.0, grad.clone(), grad.clone()),
        };
        let power = i32::try_from(time).unwrap_or(i32::MAX);
        let scalars = AdamWScalars {
            keep_1: keep * config.beta_1,
            keep_2: keep * config.beta_2,
            beta_1: config.beta_1,
            beta_2: config.beta_2,
            correction_1: 1.0 - config.beta_1.powi(power),
            correction_2: 1.0 - config.beta_2.powi(power),
            epsilon: config.epsilon,
            lr: lr as f32,
            decay: (1.0 - lr * f64::from(config.weight_decay)) as f32,
        };
        let (tensor, moment_1, moment_2) = adamw_update(tensor, grad, moment_1, moment_2, scalars);
        let momentum = AdaptiveMomentumState::new(time, moment_1, moment_2);
        (tensor, Some(AdamWState::new(momentum)))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        AdamW::to_device(state, device)
    }
}
