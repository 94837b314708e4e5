//! Benchmarks the 4-bit kernels on a device: first checks them against the reference on the
//! benchmark shapes, then times dequantization (to bf16 by default, plain and double-quantized
//! absmax) and quantization, printing time and effective bandwidth, and the fused 4-bit
//! matrix-vector product of decoding beside the dense one, the adapter's rank-wide products
//! (`low_rank_down`, the weight gradient) beside Burn's matmul, and training's 4-bit products
//! (forward and input gradient) beside Burn's dense matmul, and attention's batched products
//! beside Burn's matmul. `--tables` picks among them.
//!
//! `cargo run --release -p apps --features vulkan --bin bench-kernels -- --backend vulkan`

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use burn::backend::Dispatch;
use burn::tensor::{DType, Device, Distribution, Tensor, TimingMethod};
use clap::Parser;
use kernels_cubecl::{
    Absmax, LowRankOps, Packed4bit, QuantConfig, QuantState, QuantType, frozen_matmul,
    low_rank_down, low_rank_up, reference,
};

#[derive(Parser)]
#[command(about = "Time the NF4 quantize/dequantize kernels")]
struct Args {
    /// Backend: auto, cuda, vulkan, wgpu or flex.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Dtype of the weight and of the dequantized output: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Weight shapes, rows x columns.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "4096x4096,11008x4096,4096x11008"
    )]
    shapes: Vec<String>,
    /// Calls in a row for the wall-clock time; the median of `samples` samples is reported.
    #[arg(long, default_value_t = 50)]
    calls: usize,
    #[arg(long, default_value_t = 21)]
    samples: usize,
    /// Rows (tokens) and rank of the adapter products timed last: `x·A` and the weight gradient
    /// `xᵀ·g` at each shape's depths.
    #[arg(long, default_value_t = 2048)]
    tokens: usize,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Skip the correctness check against the reference.
    #[arg(long)]
    skip_check: bool,
    /// Attention's shape for its products, batch x heads x sequence x head width.
    #[arg(long, default_value = "4x32x512x128")]
    attention: String,
    /// Tables to print: dequantize, matvec, low-rank, matmul (the 4-bit products of training
    /// beside Burn's dense one; `KERNELS_CUBECL_TMA_TILING` tries other tilings), attention.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "dequantize,matvec,low-rank,matmul,attention"
    )]
    tables: Vec<String>,
}

const WARM_UP: std::time::Duration = std::time::Duration::from_millis(500);

/// `N` dimensions written `AxBx..`; `what` names them for the error (`ROWSxCOLUMNS`).
fn parse_dims<const N: usize>(text: &str, what: &str) -> Result<[usize; N]> {
    let dims: Vec<usize> = text
        .split('x')
        .map(|d| d.trim().parse())
        .collect::<Result<_, _>>()
        .with_context(|| format!("{text:?} is not {what}"))?;
    dims.try_into()
        .map_err(|_| anyhow::anyhow!("{text:?} is not {what}"))
}

/// Median device time of one call, in milliseconds, from the device's own timestamps (the
/// kernels alone, as CUDA events time bitsandbytes), and how the device measured it.
fn device_time_ms(
    device: &Device,
    samples: usize,
    f: &(impl Fn() + Sync),
) -> Result<(f64, TimingMethod)> {
    // Calls back to back, long enough for the GPU's clocks to leave idle before the first window.
    let start = Instant::now();
    while start.elapsed() < WARM_UP {
        f();
    }
    device.sync()?;
    let mut windows = Vec::with_capacity(samples);
    for _ in 0..samples {
        windows.push(device.profile(f)?.1);
    }
    device.sync()?;
    let method = windows[0].timing_method();
    let mut times = windows
        .into_iter()
        .map(|window| {
            let ticks =
                pollster::block_on(window.resolve()).context("a window measured nothing")?;
            Ok(ticks.duration().as_secs_f64() * 1e3)
        })
        .collect::<Result<Vec<_>>>()?;
    times.sort_by(f64::total_cmp);
    Ok((times[samples / 2], method))
}

/// Median over samples of the wall-clock time per call of `calls` calls in a row, in
/// milliseconds: what a caller sees, host overhead included.
fn wall_time_ms(device: &Device, calls: usize, samples: usize, f: impl Fn()) -> Result<f64> {
    for _ in 0..calls {
        f();
    }
    device.sync()?;
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = Instant::now();
        for _ in 0..calls {
            f();
        }
        device.sync()?;
        times.push(start.elapsed().as_secs_f64() * 1e3 / calls as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[samples / 2])
}

fn check(device: &Device, shape: [usize; 2], dtype: DType, config: QuantConfig) -> Result<()> {
    let weight = Tensor::<2>::random(shape, Distribution::Normal(0.0, 0.02), device).cast(dtype);
    let expected = reference::quantize(&weight.clone().into_data(), config)?;
    let packed = Packed4bit::quantize(weight, config)?;
    let state = packed.to_state()?;
    ensure!(
        state == expected,
        "{shape:?} {config:?}: quantized state differs from the reference: {}",
        first_difference(&state, &expected)
    );
    let dequantized = packed.dequantize::<2>()?.into_data().convert::<f32>();
    let reference = reference::dequantize(&expected)?.convert::<f32>();
    ensure!(
        dequantized == reference,
        "{shape:?} {config:?}: dequantized values differ from the reference"
    );
    // The fused matrix-vector product against the product with the dequantized weight, both
    // rounded to `dtype` once at the end: a few units of its last place apart at most.
    let x = Tensor::<2>::random([1, shape[1]], Distribution::Default, device).cast(dtype);
    let fused = packed.linear(x.clone())?.cast(DType::F32);
    let dense = x
        .cast(DType::F32)
        .matmul(packed.dequantize::<2>()?.cast(DType::F32).transpose());
    let error = relative_error(fused, dense);
    let tolerance = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
    ensure!(
        error < tolerance,
        "{shape:?} {config:?}: the 4-bit matrix-vector product is {error} (relative) from the \
         dense one, over {tolerance}"
    );
    Ok(())
}

/// `‖actual - expected‖ / ‖expected‖`.
fn relative_error<const D: usize>(actual: Tensor<D>, expected: Tensor<D>) -> f32 {
    let norm = |t: Tensor<D>| t.powi_scalar(2).sum().sqrt().into_scalar::<f32>();
    norm(actual - expected.clone()) / norm(expected)
}

/// Where two quantized states first differ, for the error message.
fn first_difference(ours: &QuantState, reference: &QuantState) -> String {
    fn first<T: PartialEq + std::fmt::Debug>(
        name: &str,
        ours: &[T],
        reference: &[T],
    ) -> Option<String> {
        let index = ours.iter().zip(reference).position(|(a, b)| a != b)?;
        Some(format!(
            "{name}[{index}] is {:?}, the reference has {:?} ({} of {} differ)",
            ours[index],
            reference[index],
            ours.iter().zip(reference).filter(|(a, b)| a != b).count(),
            ours.len()
        ))
    }
    let absmax = match (&ours.absmax, &reference.absmax) {
        (Absmax::Plain(a), Absmax::Plain(b)) => first("absmax", a, b),
        (Absmax::Double(a), Absmax::Double(b)) if a.offset != b.offset => {
            Some(format!("offset {} against {}", a.offset, b.offset))
        }
        (Absmax::Double(a), Absmax::Double(b)) => first("absmax codes", &a.codes, &b.codes)
            .or_else(|| first("nested absmax", &a.nested_absmax, &b.nested_absmax)),
        _ => Some("one absmax is double-quantized, the other not".into()),
    };
    absmax
        .or_else(|| first("packed byte", &ours.packed, &reference.packed))
        .unwrap_or_else(|| "in their metadata".into())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = apps::device(&args.backend)?;
    let dtype = apps::parse_dtype(&args.dtype)?;
    ensure!(
        device.supports_dtype(dtype),
        "{device:?} has no {dtype:?}; try --dtype f16"
    );
    let shapes = args
        .shapes
        .iter()
        .map(|s| parse_dims(s, "ROWSxCOLUMNS"))
        .collect::<Result<Vec<_>>>()?;
    println!("device: {device:?}, weights and output in {dtype:?}");
    if !args.skip_check {
        for &shape in &shapes {
            for double_quant in [false, true] {
                for quant_type in [QuantType::Nf4, QuantType::Fp4] {
                    let config = QuantConfig::new(quant_type, 64, double_quant);
                    check(&device, shape, dtype, config)?;
                }
            }
        }
        println!(
            "check: kernels equal the reference bit for bit on {} shapes (nf4/fp4, dq on/off), \
             the 4-bit matrix-vector product the dense one",
            shapes.len()
        );
    }
    let table = |name: &str| args.tables.iter().any(|t| t == name);
    if table("dequantize") {
        dequantize_table(&device, &args, dtype, &shapes)?;
    }
    if table("matvec") {
        matvec_table(&device, &args, dtype, &shapes)?;
    }
    if table("low-rank") {
        low_rank_table(&device, &args, dtype, &shapes)?;
    }
    if table("matmul") {
        matmul_table(&device, &args, dtype, &shapes)?;
    }
    if table("attention") {
        attention_table(&device, &args, dtype)?;
    }
    Ok(())
}

/// Dequantization to `dtype`, plain and double-quantized absmax, and quantization.
fn dequantize_table(
    device: &Device,
    args: &Args,
    dtype: DType,
    shapes: &[[usize; 2]],
) -> Result<()> {
    println!(
        "| shape | absmax | dequantize ms (device) | effective TB/s | dequantize ms (wall, per call) | quantize ms (wall) |"
    );
    println!("|---|---|---|---|---|---|");
    for &shape in shapes {
        let elements = (shape[0] * shape[1]) as f64;
        let weight =
            Tensor::<2>::random(shape, Distribution::Normal(0.0, 0.02), device).cast(dtype);
        for double_quant in [false, true] {
            let config = QuantConfig::new(QuantType::Nf4, 64, double_quant);
            let packed = Packed4bit::quantize(weight.clone(), config)?;
            let dequantize = || {
                let _ = packed.dequantize::<2>().expect("dequantize");
            };
            let (device_ms, method) = device_time_ms(device, args.samples, &dequantize)?;
            let wall_ms = wall_time_ms(device, args.calls, args.samples, dequantize)?;
            let quantize_ms = wall_time_ms(device, 5, args.samples.min(11), || {
                let _ = Packed4bit::quantize(weight.clone(), config).expect("quantize");
            })?;
            // Half a byte of codes read and one output element written per element.
            let bytes = 0.5 + dtype.size() as f64;
            let bandwidth = elements * bytes / (device_ms * 1e-3) / 1e12;
            println!(
                "| {}x{} | {} | {device_ms:.4} ({method:?}) | {bandwidth:.2} | {wall_ms:.4} | {quantize_ms:.3} |",
                shape[0],
                shape[1],
                if double_quant { "double" } else { "plain" }
            );
        }
    }
    println!();
    Ok(())
}

/// Decoding's fused 4-bit matrix-vector product beside the dense one.
fn matvec_table(device: &Device, args: &Args, dtype: DType, shapes: &[[usize; 2]]) -> Result<()> {
    println!(
        "| shape | 4-bit matvec ms (device) | packed TB/s | 4-bit matvec ms (wall) | dense matvec ms (wall) |"
    );
    println!("|---|---|---|---|---|");
    for &shape in shapes {
        let elements = (shape[0] * shape[1]) as f64;
        let weight =
            Tensor::<2>::random(shape, Distribution::Normal(0.0, 0.02), device).cast(dtype);
        let packed = Packed4bit::quantize(weight.clone(), QuantConfig::default())?;
        let x = Tensor::<2>::random([1, shape[1]], Distribution::Default, device).cast(dtype);
        let matvec = || {
            let _ = packed.linear(x.clone()).expect("4-bit matvec");
        };
        let (device_ms, method) = device_time_ms(device, args.samples, &matvec)?;
        let wall_ms = wall_time_ms(device, args.calls, args.samples, matvec)?;
        let weight_t = weight.transpose();
        let dense_ms = wall_time_ms(device, args.calls, args.samples, || {
            let _ = x.clone().matmul(weight_t.clone());
        })?;
        // What must be read: half a byte of codes per element and one absmax code per block.
        let bytes = elements * (0.5 + 1.0 / 64.0);
        let bandwidth = bytes / (device_ms * 1e-3) / 1e12;
        println!(
            "| {}x{} | {device_ms:.4} ({method:?}) | {bandwidth:.2} | {wall_ms:.4} | {dense_ms:.4} |",
            shape[0], shape[1]
        );
    }
    println!();
    Ok(())
}

/// The adapter's products at each depth of the shapes: `x·A` (`[tokens, depth] x [depth, rank]`)
/// the weight gradient `xᵀ·g` (`g` `[tokens, rank]`) and `g·B` (`[tokens, rank] x [rank,
/// depth]`), ours and Burn's matmul. Each reads or writes `[tokens, depth]` once, which bounds it.
fn low_rank_table(device: &Device, args: &Args, dtype: DType, shapes: &[[usize; 2]]) -> Result<()> {
    let mut depths: Vec<usize> = shapes.iter().flatten().copied().collect();
    depths.sort_unstable();
    depths.dedup();
    println!(
        "| tokens x depth, rank {} | x·A ms (device) | TB/s | Burn's x·A ms | xᵀ·g ms (device) | TB/s | Burn's xᵀ·g ms | g·B ms | TB/s | Burn's g·B ms |",
        args.rank
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for depth in depths {
        let x =
            Tensor::<2>::random([args.tokens, depth], Distribution::Default, device).cast(dtype);
        let a = Tensor::<2>::random([depth, args.rank], Distribution::Default, device).cast(dtype);
        let g = Tensor::<2>::random([args.tokens, args.rank], Distribution::Default, device)
            .cast(dtype);
        let time = |f: &(dyn Fn() + Sync)| device_time_ms(device, args.samples, &f);
        let (down_ms, _) = time(&|| {
            let _ = low_rank_down(x.clone(), a.clone());
        })?;
        let (burn_down_ms, _) = time(&|| {
            let _ = x.clone().matmul(a.clone());
        })?;
        let (gradient_ms, _) = time(&|| {
            let _ =
                Dispatch::low_rank_gradient(x.clone().into_dispatch(), g.clone().into_dispatch());
        })?;
        let (burn_gradient_ms, _) = time(&|| {
            let _ = x.clone().transpose().matmul(g.clone());
        })?;
        let b = a.clone().transpose();
        let (up_ms, _) = time(&|| {
            let _ = low_rank_up(g.clone(), b.clone());
        })?;
        let (burn_up_ms, _) = time(&|| {
            let _ = g.clone().matmul(b.clone());
        })?;
        let bytes = (args.tokens * depth * dtype.size()) as f64;
        let tb_s = |ms: f64| bytes / (ms * 1e-3) / 1e12;
        println!(
            "| {}x{depth} | {down_ms:.4} | {:.2} | {burn_down_ms:.4} | {gradient_ms:.4} | {:.2} | {burn_gradient_ms:.4} | {up_ms:.4} | {:.2} | {burn_up_ms:.4} |",
            args.tokens,
            tb_s(down_ms),
            tb_s(gradient_ms),
            tb_s(up_ms)
        );
    }
    Ok(())
}

/// Training's 4-bit products at `tokens` rows, dequantization included: a linear layer's forward
/// `x·Wᵀ` and its input gradient `g·W`, each with its result's distance from Burn's product of
/// the dequantized weight, the same product of that dense weight through the same routine
/// (`frozen_matmul`) and the 4-bit product's time over the dense one's.
fn matmul_table(device: &Device, args: &Args, dtype: DType, shapes: &[[usize; 2]]) -> Result<()> {
    let tiling = std::env::var("KERNELS_CUBECL_TMA_TILING").unwrap_or_else(|_| "tuned".into());
    println!("4-bit matmul, TMA tiling {tiling}");
    println!(
        "| weight rows x cols, {} tokens | x·Wᵀ ms (device) | TFLOP/s | error | dense x·Wᵀ ms | 4-bit / dense | g·W ms (device) | TFLOP/s | error | dense g·W ms | 4-bit / dense |",
        args.tokens
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for &shape in shapes {
        let [rows, cols] = shape;
        let weight =
            Tensor::<2>::random(shape, Distribution::Normal(0.0, 0.02), device).cast(dtype);
        let packed = Packed4bit::quantize(weight, QuantConfig::default())?;
        let dense = packed.dequantize::<2>()?;
        let x = Tensor::<2>::random([args.tokens, cols], Distribution::Default, device).cast(dtype);
        let g = Tensor::<2>::random([args.tokens, rows], Distribution::Default, device).cast(dtype);
        let forward_error = relative_error(
            packed.linear(x.clone())?.cast(DType::F32),
            x.clone().matmul(dense.clone().transpose()).cast(DType::F32),
        );
        let gradient_error = relative_error(
            packed.matmul(g.clone())?.cast(DType::F32),
            g.clone().matmul(dense.clone()).cast(DType::F32),
        );
        let time = |f: &(dyn Fn() + Sync)| device_time_ms(device, args.samples, &f);
        let (forward_ms, _) = time(&|| {
            let _ = packed.linear(x.clone()).expect("4-bit matmul");
        })?;
        let (gradient_ms, _) = time(&|| {
            let _ = packed.matmul(g.clone()).expect("4-bit matmul");
        })?;
        let dense_in_dtype = dense.cast(dtype);
        let dense_t = dense_in_dtype.clone().transpose();
        let (dense_forward_ms, _) = time(&|| {
            let _ = frozen_matmul(x.clone(), dense_t.clone());
        })?;
        let (dense_gradient_ms, _) = time(&|| {
            let _ = frozen_matmul(g.clone(), dense_in_dtype.clone());
        })?;
        let tflops = |ms: f64| 2.0 * (args.tokens * rows * cols) as f64 / (ms * 1e-3) / 1e12;
        println!(
            "| {rows}x{cols} | {forward_ms:.4} | {:.0} | {forward_error:.1e} | {dense_forward_ms:.4} | {:.3} | {gradient_ms:.4} | {:.0} | {gradient_error:.1e} | {dense_gradient_ms:.4} | {:.3} |",
            tflops(forward_ms),
            forward_ms / dense_forward_ms,
            tflops(gradient_ms),
            gradient_ms / dense_gradient_ms,
        );
    }
    println!();
    Ok(())
}

/// Attention's six batched products at `--attention`'s shape (the scores and weighted values of
/// the forward, the four of its backward), through `batched_matmul` beside Burn's matmul, with
/// each result's distance from Burn's. The heads come as the model makes them: the queries,
/// keys and values `[batch, seq, heads, width]` with the heads' dimensions swapped.
fn attention_table(device: &Device, args: &Args, dtype: DType) -> Result<()> {
    let [batch, heads, seq, width] = parse_dims(&args.attention, "BATCHxHEADSxSEQxWIDTH")?;
    let random =
        |shape: [usize; 4]| Tensor::<4>::random(shape, Distribution::Default, device).cast(dtype);
    let heads_of = || random([batch, seq, heads, width]).swap_dims(1, 2);
    let (q, k, v) = (heads_of(), heads_of(), heads_of());
    let square = random([batch, heads, seq, seq]);
    let narrow = random([batch, heads, seq, width]);
    let t = |x: &Tensor<4>| x.clone().swap_dims(2, 3);
    let products: [(&str, Tensor<4>, Tensor<4>); 6] = [
        ("scores q·kᵀ", q.clone(), t(&k)),
        ("values p·v", square.clone(), v.clone()),
        ("dp = g·vᵀ", narrow.clone(), t(&v)),
        ("dv = pᵀ·g", t(&square), narrow.clone()),
        ("dq = ds·k", square.clone(), k),
        ("dk = dsᵀ·q", t(&square), q),
    ];
    println!("attention products, {batch} x {heads} heads x {seq} x {width}, {dtype:?}");
    println!("| product | ms (device) | TFLOP/s | error | Burn's matmul ms | TFLOP/s |");
    println!("|---|---|---|---|---|---|");
    for (name, lhs, rhs) in products {
        let [_, _, m, depth] = lhs.dims();
        let n = rhs.dims()[3];
        let error = relative_error(
            kernels_cubecl::batched_matmul(lhs.clone(), rhs.clone()).cast(DType::F32),
            lhs.clone().matmul(rhs.clone()).cast(DType::F32),
        );
        let time = |f: &(dyn Fn() + Sync)| device_time_ms(device, args.samples, &f);
        let (ours_ms, _) = time(&|| {
            let _ = kernels_cubecl::batched_matmul(lhs.clone(), rhs.clone());
        })?;
        let (burn_ms, _) = time(&|| {
            let _ = lhs.clone().matmul(rhs.clone());
        })?;
        let flops = 2.0 * (batch * heads * m * n * depth) as f64;
        let tflops = |ms: f64| flops / (ms * 1e-3) / 1e12;
        println!(
            "| {name} | {ours_ms:.4} | {:.0} | {error:.1e} | {burn_ms:.4} | {:.0} |",
            tflops(ours_ms),
            tflops(burn_ms)
        );
    }
    println!();
    Ok(())
}
