use burn::module::Module;
use burn::tensor::{DType, Tensor};
use burn_qlora::kernels::swiglu;
use burn_qlora::{Projection, QuantError};

/// The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_proj: Projection,
    pub up_proj: Projection,
    pub down_proj: Projection,
}

impl Mlp {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.down_proj.forward(self.gated(x))
    }

    /// Zeros whose backward gives the block's gradients for its output gradient `grad`, the
    /// last projection's product never computed (see `Projection::pullback`).
    pub fn pullback(&self, x: Tensor<3>, grad: Tensor<3>) -> Tensor<3> {
        self.down_proj.pullback(self.gated(x), grad)
    }

    /// Two copies for activation checkpointing, the first keeping each adapter's hidden, the
    /// second taking them (see `Attention::with_kept_hiddens`).
    pub fn with_kept_hiddens(&self) -> (Self, Self) {
        let (gate_keep, gate_take) = self.gate_proj.with_kept_hidden();
        let (up_keep, up_take) = self.up_proj.with_kept_hidden();
        let (down_keep, down_take) = self.down_proj.with_kept_hidden();
        (
            Self {
                gate_proj: gate_keep,
                up_proj: up_keep,
                down_proj: down_keep,
            },
            Self {
                gate_proj: gate_take,
                up_proj: up_take,
                down_proj: down_take,
            },
        )
    }

    /// The same block, its 4-bit bases carrying their dequantized copies in `dtype`.
    pub fn with_dense_copies(&self, dtype: DType) -> Result<Self, QuantError> {
        Ok(Self {
            gate_proj: self.gate_proj.with_dense_copy(dtype)?,
            up_proj: self.up_proj.with_dense_copy(dtype)?,
            down_proj: self.down_proj.with_dense_copy(dtype)?,
        })
    }

    /// `silu(gate(x)) * up(x)`: the last projection's input.
    fn gated(&self, x: Tensor<3>) -> Tensor<3> {
        swiglu(self.gate_proj.forward(x.clone()), self.up_proj.forward(x))
    }
}
