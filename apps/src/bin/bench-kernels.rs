//! Benchmarks the 4-bit kernels on a device: first checks them against the reference on the
//! benchmark shapes, then times dequantization (to bf16, plain and double-quantized absmax) and
//! quantization, printing time and effective bandwidth.
//!
//! `cargo run --release -p apps --features cuda --bin bench-kernels -- --backend cuda`

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use burn::tensor::{DType, Device, Distribution, Tensor};
use clap::Parser;
use kernels_cubecl::{Packed4bit, QuantConfig, QuantType, reference};

#[derive(Parser)]
#[command(about = "Time the NF4 quantize/dequantize kernels")]
struct Args {
    /// Backend: auto, cuda, wgpu or flex.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Weight shapes, rows x columns.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "4096x4096,11008x4096,4096x11008"
    )]
    shapes: Vec<String>,
    /// Timed calls per sample; the median of `samples` samples is reported.
    #[arg(long, default_value_t = 50)]
    calls: usize,
    #[arg(long, default_value_t = 21)]
    samples: usize,
    /// Skip the correctness check against the reference.
    #[arg(long)]
    skip_check: bool,
}

fn parse_shape(text: &str) -> Result<[usize; 2]> {
    let (rows, cols) = text.split_once('x').context("a shape is ROWSxCOLUMNS")?;
    Ok([rows.trim().parse()?, cols.trim().parse()?])
}

/// Median over samples of the mean time of `calls` calls, in milliseconds.
fn time_ms(device: &Device, calls: usize, samples: usize, mut f: impl FnMut()) -> Result<f64> {
    for _ in 0..3 {
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

fn check(device: &Device, shape: [usize; 2], config: QuantConfig) -> Result<()> {
    let weight =
        Tensor::<2>::random(shape, Distribution::Normal(0.0, 0.02), device).cast(DType::BF16);
    let expected = reference::quantize(&weight.clone().into_data(), config)?;
    let packed = Packed4bit::quantize(weight, config)?;
    ensure!(
        packed.to_state()? == expected,
        "{shape:?} {config:?}: quantized state differs from the reference"
    );
    let dequantized = packed.dequantize::<2>()?.into_data().convert::<f32>();
    let reference = reference::dequantize(&expected)?.convert::<f32>();
    ensure!(
        dequantized == reference,
        "{shape:?} {config:?}: dequantized values differ from the reference"
    );
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = apps::device(&args.backend)?;
    let shapes = args
        .shapes
        .iter()
        .map(|s| parse_shape(s))
        .collect::<Result<Vec<_>>>()?;
    println!("device: {device:?}");
    if !args.skip_check {
        for &shape in &shapes {
            for double_quant in [false, true] {
                for quant_type in [QuantType::Nf4, QuantType::Fp4] {
                    check(
                        &device,
                        shape,
                        QuantConfig::new(quant_type, 64, double_quant),
                    )?;
                }
            }
        }
        println!(
            "check: kernels equal the reference bit for bit on {} shapes (nf4/fp4, dq on/off)",
            shapes.len()
        );
    }
    println!("| shape | absmax | dequantize ms | effective TB/s | quantize ms |");
    println!("|---|---|---|---|---|");
    for &shape in &shapes {
        let elements = (shape[0] * shape[1]) as f64;
        let weight =
            Tensor::<2>::random(shape, Distribution::Normal(0.0, 0.02), &device).cast(DType::BF16);
        for double_quant in [false, true] {
            let config = QuantConfig::new(QuantType::Nf4, 64, double_quant);
            let packed = Packed4bit::quantize(weight.clone(), config)?;
            let dequantize = time_ms(&device, args.calls, args.samples, || {
                let _ = packed.dequantize::<2>().expect("dequantize");
            })?;
            let quantize = time_ms(&device, 5, args.samples.min(11), || {
                let _ = Packed4bit::quantize(weight.clone(), config).expect("quantize");
            })?;
            // 0.5 byte of codes read and 2 bytes of bf16 written per element.
            let bandwidth = elements * 2.5 / (dequantize * 1e-3) / 1e12;
            println!(
                "| {}x{} | {} | {dequantize:.4} | {bandwidth:.2} | {quantize:.3} |",
                shape[0],
                shape[1],
                if double_quant { "double" } else { "plain" }
            );
        }
    }
    Ok(())
}
