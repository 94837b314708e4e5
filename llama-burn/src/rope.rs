use burn::tensor::{DType, Device, Tensor, TensorData};
use burn_qlora::kernels::rotary;

/// Rotary position embeddings in Hugging Face's layout: the two halves of each head are the
/// rotated pairs (`rotate_half`), not interleaved neighbours as in Meta's checkpoints.
#[derive(Clone, Debug)]
pub struct Rope {
    /// `[max_positions, head_dim]`, f32.
    cos: Tensor<2>,
    sin: Tensor<2>,
}

impl Rope {
    pub fn new(head_dim: usize, max_positions: usize, theta: f64, device: &Device) -> Self {
        // As transformers: inverse frequencies and angles in f32, then cos/sin.
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
            .collect();
        let mut cos = Vec::with_capacity(max_positions * head_dim);
        let mut sin = Vec::with_capacity(max_positions * head_dim);
        for position in 0..max_positions {
            // Both halves of a head use the same angles (`cat(freqs, freqs)`).
            for &freq in inv_freq.iter().chain(&inv_freq) {
                let angle = position as f32 * freq;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let table = |values: Vec<f32>| {
            Tensor::from_data(
                TensorData::new(values, [max_positions, head_dim]),
                (device, DType::F32),
            )
        };
        Self {
            cos: table(cos),
            sin: table(sin),
        }
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Rotates `x` (`[batch, heads, seq, head_dim]`, any strides: the heads as the projection
    /// left them) whose first token is at `offset`; the result is contiguous.
    pub fn apply(&self, x: Tensor<4>, offset: usize) -> Tensor<4> {
        rotary(x, self.cos.clone(), self.sin.clone(), offset)
    }
}
