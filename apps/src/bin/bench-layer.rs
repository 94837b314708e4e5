//! Peak device memory and step time of forward + backward through one LoRA layer (4096 -> 11008,
//! 2048 tokens by default), the input requiring its gradient as inside a network:
//!
//! - `ours`: burn-qlora's 4-bit base, whose backward dequantizes the packed weight again;
//! - `naive`: the same 4-bit base dequantized in the forward with a plain matmul, which keeps the
//!   dense weight alive for backward;
//! - `dense`: a dense base in the compute dtype (the weight resident all along);
//! - `burn`: Burn's own `apply_qlora` (4-bit blocks of 64, f32 scales).
//!
//! Run one variant per process, so each peak is its own:
//! `bench-layer --backend vulkan --variant ours`

use std::time::Instant;

use anyhow::{Context, Result, bail};
use apps::bench::{FUSION, median, memory_in_use, mib, peak_reserved};
use burn::module::{Lora, Module, QLora, Quantizer};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::quantization::{Calibration, QuantValue};
use burn::tensor::{DType, Device, Distribution, Tensor};
use burn_qlora::{FrozenLinear, LoraConfig, LoraLinear, QuantConfig};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Peak memory and time of one LoRA layer's forward + backward")]
struct Args {
    /// Backend: auto, cuda, vulkan, wgpu or flex.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// ours, naive, dense or burn.
    #[arg(long, default_value = "ours")]
    variant: String,
    /// Compute dtype: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    #[arg(long, default_value_t = 4096)]
    d_input: usize,
    #[arg(long, default_value_t = 11008)]
    d_output: usize,
    #[arg(long, default_value_t = 2048)]
    tokens: usize,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Timed steps after the measured one; the median is reported.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Forward calls through the layer before one backward, as a stack of that many layers
    /// would make: what each call keeps for backward adds up.
    #[arg(long, default_value_t = 1)]
    calls: usize,
}

/// The layer under test, one variant of it.
enum Layer {
    Lora(LoraLinear),
    Naive(LoraLinear),
    Burn(Linear),
}

impl Layer {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        match self {
            Self::Lora(layer) => layer.forward(x),
            Self::Naive(layer) => {
                let dense = layer
                    .base
                    .to_dense(x.dtype())
                    .expect("the base dequantizes");
                let adapter = layer.lora_b.forward(layer.lora_a.forward(x.clone()));
                dense.forward(x) + adapter.mul_scalar(layer.scaling)
            }
            Self::Burn(layer) => layer.forward(x),
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = apps::device(&args.backend)?;
    let dtype = apps::parse_dtype(&args.dtype)?;
    let layer = build(&args, &device, dtype)?;
    let x = Tensor::<3>::random(
        [1, args.tokens, args.d_input],
        Distribution::Default,
        (&device.clone().autodiff(), dtype),
    )
    .require_grad();
    device.sync()?;
    let before = memory_in_use(&device)?;

    let loss = forward(&layer, &x, args.calls);
    device.sync()?;
    let held = memory_in_use(&device)?.saturating_sub(before);
    let grads = loss.backward();
    let grad_x = x.grad(&grads).context("the input has no gradient")?;
    device.sync()?;
    let peak = peak_reserved(&device)?;
    drop((grad_x, grads));

    let (mut forward_ms, mut backward_ms) = (Vec::new(), Vec::new());
    for _ in 0..args.steps {
        let start = Instant::now();
        let loss = forward(&layer, &x, args.calls);
        device.sync()?;
        forward_ms.push(start.elapsed().as_secs_f64() * 1e3);
        let start = Instant::now();
        let grads = loss.backward();
        device.sync()?;
        backward_ms.push(start.elapsed().as_secs_f64() * 1e3);
        drop(grads);
    }
    println!(
        "{} {}x{} {} tokens {:?} x{} calls, fusion {}: held for backward {:.1} MiB, peak reserved {:.1} MiB, \
         forward {:.2} ms, backward {:.2} ms",
        args.variant,
        args.d_input,
        args.d_output,
        args.tokens,
        dtype,
        args.calls,
        FUSION,
        mib(held),
        mib(peak),
        median(forward_ms),
        median(backward_ms),
    );
    Ok(())
}

/// The sum of `calls` forward passes of `x` through the layer.
fn forward(layer: &Layer, x: &Tensor<3>, calls: usize) -> Tensor<1> {
    (0..calls)
        .map(|_| layer.forward(x.clone()).sum())
        .reduce(|a, b| a + b)
        .expect("at least one call")
}

fn build(args: &Args, device: &Device, dtype: DType) -> Result<Layer> {
    let weight = Tensor::<2>::random(
        [args.d_input, args.d_output],
        Distribution::Normal(0.0, 0.02),
        device,
    );
    let linear = LinearConfig::new(args.d_input, args.d_output)
        .with_bias(false)
        .init(device);
    let linear = Linear {
        weight: linear.weight.map(|_| weight.cast(dtype)),
        bias: None,
    };
    let lora = LoraConfig::new(args.rank).with_alpha(16.0);
    let cast = |layer: LoraLinear| -> LoraLinear {
        // Adapters in the compute dtype, as the base.
        let mut layer = layer;
        layer.lora_a.weight = layer.lora_a.weight.map(|w| w.cast(dtype));
        layer.lora_b.weight = layer.lora_b.weight.map(|w| w.cast(dtype));
        layer.train()
    };
    Ok(match args.variant.as_str() {
        "ours" | "naive" => {
            let base = FrozenLinear::new(linear, Some(QuantConfig::default()))?;
            let layer = cast(lora.init(base));
            if args.variant == "ours" {
                Layer::Lora(layer)
            } else {
                Layer::Naive(layer)
            }
        }
        "dense" => Layer::Lora(cast(lora.init(linear))),
        "burn" => {
            let scheme = device
                .settings()
                .quantization
                .scheme
                .with_value(QuantValue::Q4S)
                .per_block([64], burn::tensor::quantization::ScaleDtype::F32);
            let quantizer = Quantizer::new(Calibration::MinMax, scheme);
            let qlora = QLora::new(Lora::new(args.rank, 16.0), quantizer);
            Layer::Burn(linear.apply_qlora(qlora).train())
        }
        other => bail!("variant {other:?}: use ours, naive, dense or burn"),
    })
}
