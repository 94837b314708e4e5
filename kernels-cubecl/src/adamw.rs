//! One AdamW update of a parameter as one Burn operation: the new parameter and both moments from
//! one pass over the parameter, its gradient and its moments, in f32 inside.
//!
//! Burn's `AdamW` takes 15 tensor operations a parameter; a 7B model's LoRA adapters are 448
//! small parameters, so its ~6,700 operations a step kept the host (autodiff, fusion's planning,
//! the launches) busy far longer than the device needed for them. The arithmetic is Burn's, in
//! its order, so the results match it to the last bits or nearly.
//!
//! Flex (the CPU backend) runs a plain-Rust loop beside the kernel.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::Tensor;

/// The scalars of one AdamW update, as [`adamw_update`] applies them:
///
/// - `moment_1 = keep_1 · moment_1 + (1 - beta_1) · grad`, `moment_2` likewise with `grad²`;
/// - `param = decay · param - lr · (moment_1 / correction_1) / (sqrt(moment_2 / correction_2) +
///   epsilon)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWScalars {
    /// What the old moments are multiplied by: `beta_1`, `beta_2`; 0 at the first step, whose
    /// moments start from zero (the old moments are then not read for their values).
    pub keep_1: f32,
    pub keep_2: f32,
    pub beta_1: f32,
    pub beta_2: f32,
    /// The bias corrections `1 - beta_1^t` and `1 - beta_2^t` of step `t` (from 1).
    pub correction_1: f32,
    pub correction_2: f32,
    pub epsilon: f32,
    /// The learning rate.
    pub lr: f32,
    /// The decoupled weight decay's factor `1 - lr · weight_decay`.
    pub decay: f32,
}

#[backend_extension(
    Cube: cfg(feature = "cube"),
    Fusion: cfg(all(feature = "cube", feature = "fusion")),
    Flex: cfg(feature = "flex")
)]
pub trait AdamWOps: Backend {
    /// The updated parameter, first moment and second moment (in that order) for tensors of one
    /// shape and dtype.
    #[fusion(meta = |param, _, moment_1, moment_2, _| {
        (param.clone(), moment_1.clone(), moment_2.clone())
    })]
    fn adamw_update(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        scalars: AdamWScalars,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// Whether [`adamw_update`] runs as one operation for these tensors: a device with this crate's
/// extensions and one dtype throughout. Otherwise the caller takes Burn's operations.
pub fn fused_adamw_supported<const D: usize>(param: &Tensor<D>, grad: &Tensor<D>) -> bool {
    crate::has_extensions(&param.device()) && param.dtype() == grad.dtype()
}

/// One AdamW update (see [`AdamWScalars`]): the new parameter, first and second moment. The
/// tensors lose any autodiff association (an optimizer works on the graph's leaves' values).
///
/// # Panics
///
/// If the four differ in shape, or [`fused_adamw_supported`] is false for them.
pub fn adamw_update<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    moment_1: Tensor<D>,
    moment_2: Tensor<D>,
    scalars: AdamWScalars,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let dims = param.dims();
    for (name, other) in [
        ("grad", grad.dims()),
        ("moment_1", moment_1.dims()),
        ("moment_2", moment_2.dims()),
    ] {
        assert_eq!(
            dims, other,
            "adamw_update: parameter {dims:?} and {name} {other:?} differ in shape"
        );
    }
    assert!(
        fused_adamw_supported(&param, &grad),
        "adamw_update: no fused update for a {:?} parameter with a {:?} gradient on {:?}",
        param.dtype(),
        grad.dtype(),
        param.device()
    );
    let dtype = param.dtype();
    let (param, moment_1, moment_2) = Dispatch::adamw_update(
        param.inner().into_dispatch(),
        grad.inner().into_dispatch(),
        moment_1.inner().cast(dtype).into_dispatch(),
        moment_2.inner().cast(dtype).into_dispatch(),
        scalars,
    );
    (
        Tensor::from_dispatch(param),
        Tensor::from_dispatch(moment_1),
        Tensor::from_dispatch(moment_2),
    )
}

/// One element's update, for Flex's loop: the kernel's arithmetic, in the same order.
#[cfg(feature = "flex")]
fn update(param: f32, grad: f32, moment_1: f32, moment_2: f32, s: &AdamWScalars) -> [f32; 3] {
    let moment_1 = moment_1 * s.keep_1 + grad * (1.0 - s.beta_1);
    let moment_2 = moment_2 * s.keep_2 + grad * grad * (1.0 - s.beta_2);
    let delta = (moment_1 / s.correction_1) / ((moment_2 / s.correction_2).sqrt() + s.epsilon);
    [param * s.decay - delta * s.lr, moment_1, moment_2]
}

#[cfg(feature = "cube")]
mod cube {
    use burn::backend::TensorMetadata;
    use burn::backend::cubecl::dtype_to_storage_type;
    use burn_cubecl::CubeBackend;
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::prelude::*;

    use super::{AdamWOps, AdamWScalars};
    use crate::extension::{launch_dims, vector_size};

    /// `tensor` as flat memory held by nothing else, so the update may overwrite it: itself when
    /// it is (the old parameter and the optimizer's state are, after the first step), else a
    /// flat copy (never Burn's `copy`, which may pitch a 2-D tensor's rows on CUDA).
    ///
    /// Held includes bound: `into_data` on CubeCL reads lazily, when the data is first looked
    /// at, so a checkpoint's record (saved on the Learner's writer thread) still points at these
    /// buffers while training goes on; `can_mut` counts tensors only.
    fn writable(tensor: CubeTensor) -> CubeTensor {
        let tensor = into_contiguous(tensor);
        if tensor.can_mut() && !tensor.handle.memory.is_bound() && tensor.is_contiguous_buffer() {
            return tensor;
        }
        let (client, device, dtype) = (tensor.client.clone(), tensor.device.clone(), tensor.dtype);
        let copy = cubecl::std::tensor::into_contiguous(
            &client,
            tensor.binding(),
            dtype_to_storage_type(dtype),
        );
        CubeTensor::new(client, copy.handle, *copy.metadata, device, dtype)
    }

    impl AdamWOps for CubeBackend {
        fn adamw_update(
            param: CubeTensor,
            grad: CubeTensor,
            moment_1: CubeTensor,
            moment_2: CubeTensor,
            s: AdamWScalars,
        ) -> (CubeTensor, CubeTensor, CubeTensor) {
            let [param, moment_1, moment_2] = [param, moment_1, moment_2].map(writable);
            let grad = into_contiguous(grad);
            let elements = param.shape().num_elements();
            let vector = vector_size(&param, elements);
            let units = elements / vector;
            if units == 0 {
                return (param, moment_1, moment_2);
            }
            let (cube_count, cube_dim) = launch_dims(&param, units);
            let dtype = param.dtype;
            // SAFETY: each of `units` units reads one vector of the four contiguous tensors,
            // `units` vectors long, and writes it back in place in three of them.
            unsafe {
                adamw_kernel::launch_unchecked(
                    &param.client,
                    cube_count,
                    cube_dim,
                    vector,
                    param.clone().into_buffer_arg(),
                    grad.into_buffer_arg(),
                    moment_1.clone().into_buffer_arg(),
                    moment_2.clone().into_buffer_arg(),
                    AdamWScalarsArgLaunch::new(
                        s.keep_1,
                        s.keep_2,
                        s.beta_1,
                        s.beta_2,
                        s.correction_1,
                        s.correction_2,
                        s.epsilon,
                        s.lr,
                        s.decay,
                    ),
                    units,
                    dtype_to_storage_type(dtype),
                );
            }
            (param, moment_1, moment_2)
        }
    }

    /// [`AdamWScalars`] as the kernel's argument.
    #[derive(CubeLaunch, CubeType)]
    struct AdamWScalarsArg {
        keep_1: f32,
        keep_2: f32,
        beta_1: f32,
        beta_2: f32,
        correction_1: f32,
        correction_2: f32,
        epsilon: f32,
        lr: f32,
        decay: f32,
    }

    /// One vector of the update in place, lane by lane in f32, in the order of `super::update`.
    #[cube(launch_unchecked)]
    fn adamw_kernel<F: Float, N: Size>(
        param: &mut [Vector<F, N>],
        grad: &[Vector<F, N>],
        moment_1: &mut [Vector<F, N>],
        moment_2: &mut [Vector<F, N>],
        s: AdamWScalarsArg,
        units: usize,
        #[define(F)] _dtype: ElemType,
    ) {
        let unit = ABSOLUTE_POS;
        if unit >= units {
            terminate!();
        }
        let p = Vector::<f32, N>::cast_from(param[unit]);
        let g = Vector::<f32, N>::cast_from(grad[unit]);
        let m1 = Vector::<f32, N>::cast_from(moment_1[unit]);
        let m2 = Vector::<f32, N>::cast_from(moment_2[unit]);
        let mut out_p = Vector::<f32, N>::empty();
        let mut out_m1 = Vector::<f32, N>::empty();
        let mut out_m2 = Vector::<f32, N>::empty();
        #[unroll]
        for e in 0..N::value() {
            let g_e = g.extract(e);
            let m1_e = m1.extract(e) * s.keep_1 + g_e * (f32::new(1.0) - s.beta_1);
            let m2_e = m2.extract(e) * s.keep_2 + g_e * g_e * (f32::new(1.0) - s.beta_2);
            let delta = (m1_e / s.correction_1) / (f32::sqrt(m2_e / s.correction_2) + s.epsilon);
            out_p.insert(e, p.extract(e) * s.decay - delta * s.lr);
            out_m1.insert(e, m1_e);
            out_m2.insert(e, m2_e);
        }
        param[unit] = Vector::<F, N>::cast_from(out_p);
        moment_1[unit] = Vector::<F, N>::cast_from(out_m1);
        moment_2[unit] = Vector::<F, N>::cast_from(out_m2);
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;

    use super::{AdamWOps, AdamWScalars, update};
    use crate::flex_host::{from_host, to_host};

    impl AdamWOps for Flex {
        fn adamw_update(
            param: FlexTensor,
            grad: FlexTensor,
            moment_1: FlexTensor,
            moment_2: FlexTensor,
            scalars: AdamWScalars,
        ) -> (FlexTensor, FlexTensor, FlexTensor) {
            let (param, shape, dtype) = to_host(param);
            let (grad, _, _) = to_host(grad);
            let (moment_1, _, _) = to_host(moment_1);
            let (moment_2, _, _) = to_host(moment_2);
            let mut outputs = [(); 3].map(|_| Vec::with_capacity(param.len()));
            for i in 0..param.len() {
                let values = update(param[i], grad[i], moment_1[i], moment_2[i], &scalars);
                for (output, value) in outputs.iter_mut().zip(values) {
                    output.push(value);
                }
            }
            let [param, moment_1, moment_2] =
                outputs.map(|values| from_host(values, shape.clone(), dtype));
            (param, moment_1, moment_2)
        }
    }
}
