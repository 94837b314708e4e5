//! The adapter's rank-wide products on every device (Flex, and the CubeCL kernels on wgpu/cuda
//! when built with them): forward and gradients against products computed on the host in f64.

mod common;

use burn::backend::Dispatch;
use burn::tensor::{DType, Device, Distribution, Tensor};
use common::{burn_f32_matmul_tolerance, cube_devices, devices, f32_values};
use kernels_cubecl::{LowRankOps, MAX_RANK, low_rank_down, low_rank_up, low_rank_up_add};

/// Relative (Frobenius) error allowed in f32: the kernels sum in another order than the host.
const TOLERANCE: f64 = 1e-5;

/// A row-major `[rows, cols]` matrix on the host.
struct Host {
    rows: usize,
    cols: usize,
    values: Vec<f64>,
}

impl Host {
    fn of<const D: usize>(tensor: &Tensor<D>) -> Self {
        let dims = tensor.dims();
        let cols = dims[D - 1];
        let values: Vec<f64> = f32_values(&tensor.to_data())
            .into_iter()
            .map(f64::from)
            .collect();
        Self {
            rows: values.len() / cols,
            cols,
            values,
        }
    }

    fn at(&self, row: usize, col: usize) -> f64 {
        self.values[row * self.cols + col]
    }

    fn transpose(&self) -> Self {
        let mut values = Vec::with_capacity(self.values.len());
        for col in 0..self.cols {
            values.extend((0..self.rows).map(|row| self.at(row, col)));
        }
        Self {
            rows: self.cols,
            cols: self.rows,
            values,
        }
    }

    fn matmul(&self, rhs: &Self) -> Self {
        assert_eq!(self.cols, rhs.rows);
        let mut values = vec![0.0; self.rows * rhs.cols];
        for row in 0..self.rows {
            for inner in 0..self.cols {
                let lhs = self.at(row, inner);
                for col in 0..rhs.cols {
                    values[row * rhs.cols + col] += lhs * rhs.at(inner, col);
                }
            }
        }
        Self {
            rows: self.rows,
            cols: rhs.cols,
            values,
        }
    }

    /// `|actual - self| / |self|`, Frobenius norms.
    fn relative_error(&self, actual: &Self) -> f64 {
        assert_eq!(actual.values.len(), self.values.len());
        let diff: f64 = (self.values.iter().zip(&actual.values))
            .map(|(e, a)| (e - a).powi(2))
            .sum();
        let norm: f64 = self.values.iter().map(|e| e * e).sum();
        (diff / norm).sqrt()
    }
}

/// `y = (x·A)·B` through the two products, and the gradients of `sum(y * upstream)` for `x`, `A`
/// and `B`, against the host. The shapes are ragged on purpose: 600 rows (ten blocks of 64 for
/// the gradient kernel, the last partial, summed eight and then two at a time), depth 1300 (three
/// slices of the down kernel's 512, the last ending inside a plane's run), odd ranks, and
/// a rank above `MAX_RANK` (Burn's matmul).
#[test]
fn low_rank_products_and_gradients_equal_the_host_products() {
    for (name, device) in devices() {
        for rank in [1, 5, 8, MAX_RANK, MAX_RANK + 8] {
            let autodiff = device.clone().autodiff();
            let random = |dims: [usize; 2]| {
                Tensor::<2>::random(dims, Distribution::Default, &autodiff).require_grad()
            };
            let x = Tensor::<3>::random([4, 150, 1300], Distribution::Default, &autodiff)
                .require_grad();
            let a = random([1300, rank]);
            let b = random([rank, 70]);
            let upstream = Tensor::<3>::random([4, 150, 70], Distribution::Default, &autodiff);

            let y = low_rank_up(low_rank_down(x.clone(), a.clone()), b.clone());
            let grads = (y.clone() * upstream.clone()).sum().backward();

            let what = format!("{name}, rank {rank}");
            let (hx, ha, hb, hu) = (
                Host::of(&x),
                Host::of(&a),
                Host::of(&b),
                Host::of(&upstream),
            );
            let hidden = hx.matmul(&ha);
            let grad_hidden = hu.matmul(&hb.transpose());
            let expected = [
                ("y", hidden.matmul(&hb), Host::of(&y)),
                (
                    "x grad",
                    grad_hidden.matmul(&ha.transpose()),
                    Host::of(&x.grad(&grads).expect("x has a gradient")),
                ),
                (
                    "A grad",
                    hx.transpose().matmul(&grad_hidden),
                    Host::of(&a.grad(&grads).expect("A has a gradient")),
                ),
                (
                    "B grad",
                    hidden.transpose().matmul(&hu),
                    Host::of(&b.grad(&grads).expect("B has a gradient")),
                ),
            ];
            // Ranks above MAX_RANK take Burn's matmul.
            let tolerance = if rank > MAX_RANK {
                burn_f32_matmul_tolerance(name, TOLERANCE)
            } else {
                TOLERANCE
            };
            for (part, expected, actual) in expected {
                let error = expected.relative_error(&actual);
                assert!(error < tolerance, "{what}: {part} relative error {error}");
            }
        }
    }
}

/// The backward hands the kernels `Aᵀ` and `Bᵀ` as transposed views, which they read in place:
/// `x·Wᵀ` and `h·Wᵀ` for weights stored the other way round equal the host's products. Depth 1300
/// and width 70 (vectors of four and two f32), ranks 1, 5 and 8 (single elements, then vectors of
/// the rank).
#[test]
fn low_rank_products_read_transposed_weights() {
    for (name, device) in devices() {
        for rank in [1, 5, 8] {
            let random =
                |dims: [usize; 2]| Tensor::<2>::random(dims, Distribution::Default, &device);
            let x = random([600, 1300]);
            let down_stored = random([rank, 1300]);
            let hidden = random([600, rank]);
            let up_stored = random([70, rank]);

            let down = low_rank_down(x.clone(), down_stored.clone().transpose());
            let up = low_rank_up(hidden.clone(), up_stored.clone().transpose());

            let what = format!("{name}, rank {rank}");
            let expected_down = Host::of(&x).matmul(&Host::of(&down_stored).transpose());
            let expected_up = Host::of(&hidden).matmul(&Host::of(&up_stored).transpose());
            for (part, expected, actual) in [
                ("x·Wᵀ", expected_down, Host::of(&down)),
                ("h·Wᵀ", expected_up, Host::of(&up)),
            ] {
                let error = expected.relative_error(&actual);
                assert!(error < TOLERANCE, "{what}: {part} relative error {error}");
            }
        }
    }
}

/// A LoRA layer's output, `base + h·B` in one kernel, and the gradients of `sum(y * upstream)`
/// for the base, `h` and `B`, against the host; widths 70 (two-element vectors) and 64, ranks 1,
/// 8 and one above `MAX_RANK` (Burn's matmul and add).
#[test]
fn low_rank_up_add_and_its_gradients_equal_the_host() {
    for (name, device) in devices() {
        for (rank, width) in [(1, 70), (8, 64), (8, 70), (MAX_RANK + 8, 64)] {
            let autodiff = device.clone().autodiff();
            let random = |dims: [usize; 3]| {
                Tensor::<3>::random(dims, Distribution::Default, &autodiff).require_grad()
            };
            let base = random([4, 150, width]);
            let hidden = random([4, 150, rank]);
            let b =
                Tensor::<2>::random([rank, width], Distribution::Default, &autodiff).require_grad();
            let upstream = Tensor::<3>::random([4, 150, width], Distribution::Default, &autodiff);

            let y = low_rank_up_add(base.clone(), hidden.clone(), b.clone());
            let grads = (y.clone() * upstream.clone()).sum().backward();

            let (hbase, hh, hb, hu) = (
                Host::of(&base),
                Host::of(&hidden),
                Host::of(&b),
                Host::of(&upstream),
            );
            let product = hh.matmul(&hb);
            let sum = Host {
                values: (hbase.values.iter().zip(&product.values))
                    .map(|(base, product)| base + product)
                    .collect(),
                ..product
            };
            let expected = [
                ("y", sum, Host::of(&y)),
                (
                    "base grad",
                    Host::of(&upstream),
                    Host::of(&base.grad(&grads).expect("the base has a gradient")),
                ),
                (
                    "h grad",
                    hu.matmul(&hb.transpose()),
                    Host::of(&hidden.grad(&grads).expect("h has a gradient")),
                ),
                (
                    "B grad",
                    hh.transpose().matmul(&hu),
                    Host::of(&b.grad(&grads).expect("B has a gradient")),
                ),
            ];
            let tolerance = if rank > MAX_RANK {
                burn_f32_matmul_tolerance(name, TOLERANCE)
            } else {
                TOLERANCE
            };
            let what = format!("{name}, rank {rank}, width {width}");
            for (part, expected, actual) in expected {
                let error = expected.relative_error(&actual);
                assert!(error < tolerance, "{what}: {part} relative error {error}");
            }
        }
    }
}

/// The third product, `xᵀ·g` (the weight gradient), differentiated itself: its gradients go
/// back through the other two products. 301 columns: no vector wider than one element divides
/// them, so the down and up kernels read element by element.
#[test]
fn low_rank_gradient_product_is_differentiable() {
    for (name, device) in devices() {
        let autodiff = device.clone().autodiff();
        let x = Tensor::<2>::random([150, 301], Distribution::Default, &autodiff).require_grad();
        let g = Tensor::<2>::random([150, 8], Distribution::Default, &autodiff).require_grad();
        let upstream = Tensor::<2>::random([301, 8], Distribution::Default, &autodiff);
        let out = Tensor::<2>::from_dispatch(Dispatch::low_rank_gradient(
            x.clone().into_dispatch(),
            g.clone().into_dispatch(),
        ));
        let grads = (out.clone() * upstream.clone()).sum().backward();

        let (hx, hg, hu) = (Host::of(&x), Host::of(&g), Host::of(&upstream));
        let expected = [
            ("out", hx.transpose().matmul(&hg), Host::of(&out)),
            (
                "x grad",
                hg.matmul(&hu.transpose()),
                Host::of(&x.grad(&grads).expect("x has a gradient")),
            ),
            (
                "g grad",
                hx.matmul(&hu),
                Host::of(&g.grad(&grads).expect("g has a gradient")),
            ),
        ];
        for (part, expected, actual) in expected {
            let error = expected.relative_error(&actual);
            assert!(error < TOLERANCE, "{name}: {part} relative error {error}");
        }
    }
}

/// In bf16 (the training dtype) the kernels sum in f32 and round once: the result is the
/// host's product of the same bf16 values within bf16 rounding.
#[test]
fn low_rank_down_in_bf16_rounds_once() {
    for (name, device) in devices() {
        if !device.supports_dtype(DType::BF16) {
            println!("{name}: no bf16, skipped");
            continue;
        }
        let x = Tensor::<2>::random([40, 1000], Distribution::Default, &device).cast(DType::BF16);
        let a = Tensor::<2>::random([1000, 8], Distribution::Default, &device).cast(DType::BF16);
        let y = low_rank_down(x.clone(), a.clone());
        let expected = Host::of(&x).matmul(&Host::of(&a));
        let error = expected.relative_error(&Host::of(&y));
        // bf16 keeps 8 significant bits: one rounding is at most 2^-8 relative per value, and
        // about a quarter of that over many values.
        assert!(error < 2e-3, "{name}: relative error {error}");
    }
}

/// The weight gradient `xᵀ·g` in the half-precision dtypes sums in f32 and rounds once, at ranks
/// 8 and 16, over 300 rows and 1000 columns (neither a multiple of the kernel's blocks).
#[test]
fn low_rank_gradient_in_half_precision_rounds_once() {
    for (name, device) in devices() {
        for dtype in [DType::BF16, DType::F16] {
            if !device.supports_dtype(dtype) {
                println!("{name}: no {dtype:?}, skipped");
                continue;
            }
            for rank in [8, MAX_RANK] {
                let (expected, actual) = gradient_and_host(&device, dtype, [300, 1000, rank]);
                let error = expected.relative_error(&actual);
                // bf16 keeps 8 significant bits: one rounding is at most 2^-8 relative per value, and
                // about a quarter of that over many values.
                assert!(
                    error < 2e-3,
                    "{name}, {dtype:?}, rank {rank}: relative error {error}"
                );
            }
        }
    }
}

/// The same at shapes CUDA's hand-written `thin_gradient` takes in bf16 (the portable kernel's
/// elsewhere): whole 16-row steps (17 of them, an uneven share for its 16 warps; 32; 128) and
/// whole 32-column blocks (the 7B's 4096, and 1056), every value within one bf16 rounding of
/// the host's: at most 2^-8 of it (8 significant bits), with a thousandth of that for the f32
/// sum. Flex's bf16 matmul rounds more than once, so only the kernels' devices run it.
#[test]
fn low_rank_gradient_in_bf16_at_whole_blocks_rounds_once() {
    let devices = cube_devices();
    if devices.is_empty() {
        println!("no CubeCL device in this build, skipped");
    }
    for (name, device) in devices {
        if !device.supports_dtype(DType::BF16) {
            println!("{name}: no bf16, skipped");
            continue;
        }
        for shape in [[272, 4096, 8], [512, 1056, MAX_RANK], [2048, 4096, 8]] {
            let (expected, actual) = gradient_and_host(&device, DType::BF16, shape);
            for (i, (e, a)) in expected.values.iter().zip(&actual.values).enumerate() {
                assert!(
                    (a - e).abs() <= e.abs() * 2f64.powi(-8) * 1.001,
                    "{name}, {shape:?}: value {i} is {a}, the host's {e}"
                );
            }
        }
    }
}

/// `xᵀ·g` for random `x` `[rows, cols]` and `g` `[rows, rank]` in `dtype`, and the host's
/// product of the same values beside it.
fn gradient_and_host(
    device: &Device,
    dtype: DType,
    [rows, cols, rank]: [usize; 3],
) -> (Host, Host) {
    let x = Tensor::<2>::random([rows, cols], Distribution::Default, device).cast(dtype);
    let g = Tensor::<2>::random([rows, rank], Distribution::Default, device).cast(dtype);
    let out = Tensor::<2>::from_dispatch(Dispatch::low_rank_gradient(
        x.clone().into_dispatch(),
        g.clone().into_dispatch(),
    ));
    (
        Host::of(&x).transpose().matmul(&Host::of(&g)),
        Host::of(&out),
    )
}
