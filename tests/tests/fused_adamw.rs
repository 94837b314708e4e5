//! `FusedAdamW` (one operation a parameter) against Burn's `AdamW`, which it stands in for: the
//! same adapters after a few steps of a LoRA layer's training, and each one's optimizer record
//! resumed by the other.

use burn::module::Module;
use burn::nn::Linear;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Distribution, Tensor};
use burn_qlora::{FusedAdamWConfig, LoraConfig, LoraLinear, linear_from_torch};
use integration_tests::{model_devices, relative_error};

/// Relative, over each adapter matrix: the two run the same f32 arithmetic, one as a kernel.
const TOLERANCE: f32 = 1e-5;
const LR: f64 = 1e-2;
const WEIGHT_DECAY: f32 = 0.1;

fn layer(device: &Device) -> LoraLinear {
    let base: Linear = linear_from_torch(Tensor::random(
        [80, 96],
        Distribution::Normal(0.0, 0.5),
        device,
    ));
    let mut layer = LoraConfig::new(8).init(base);
    // B random instead of zeros, so that A's gradients are not zero either.
    layer.lora_b.weight = layer.lora_b.weight.map(|w| {
        Tensor::random(w.shape(), Distribution::Normal(0.0, 0.1), &w.device())
            .set_require_grad(true)
    });
    layer
}

/// `steps` optimizer steps on `sum(y · w)` for fixed `x` and `w`.
fn train(
    mut layer: LoraLinear,
    optimizer: &mut ModuleOptimizer,
    (x, w): &(Tensor<2>, Tensor<2>),
    steps: usize,
) -> LoraLinear {
    for _ in 0..steps {
        let grads = (layer.forward(x.clone()) * w.clone()).sum().backward();
        let grads = GradientsParams::from_grads(grads, &layer);
        layer = optimizer.step(LR, layer, grads);
    }
    layer
}

fn fused() -> ModuleOptimizer {
    FusedAdamWConfig::new()
        .with_weight_decay(WEIGHT_DECAY)
        .init()
}

fn composed() -> ModuleOptimizer {
    AdamWConfig::new().with_weight_decay(WEIGHT_DECAY).init()
}

/// Both adapter matrices agree, and training moved them from `before`.
fn assert_same_adapters(
    what: &str,
    actual: &LoraLinear,
    expected: &LoraLinear,
    before: &LoraLinear,
) {
    let value = |layer: &LoraLinear, b: bool| {
        let param = if b {
            &layer.lora_b.weight
        } else {
            &layer.lora_a.weight
        };
        param.val().inner()
    };
    for (name, b) in [("lora_A", false), ("lora_B", true)] {
        let error = relative_error(value(actual, b), value(expected, b));
        assert!(error < TOLERANCE, "{what}: {name} relative error {error}");
        let moved = relative_error(value(actual, b), value(before, b));
        assert!(moved > 1e-4, "{what}: {name} barely moved ({moved})");
    }
}

fn random_data(device: &Device) -> (Tensor<2>, Tensor<2>) {
    (
        Tensor::random([16, 96], Distribution::Normal(0.0, 1.0), device),
        Tensor::random([16, 80], Distribution::Normal(0.0, 1.0), device),
    )
}

#[test]
fn fused_adamw_trains_as_burns_adamw_does() {
    for (name, device) in model_devices() {
        let device = device.autodiff();
        let start = layer(&device);
        let data = random_data(&device);
        let expected = train(start.clone(), &mut composed(), &data, 3);
        let actual = train(start.clone(), &mut fused(), &data, 3);
        assert_same_adapters(&format!("{name}, 3 steps"), &actual, &expected, &start);
    }
}

/// Two steps with `first`, then two more with `first` and with `then` from `first`'s record and
/// the layer's.
fn resumed(
    what: &str,
    device: &Device,
    first: fn() -> ModuleOptimizer,
    then: fn() -> ModuleOptimizer,
) {
    let data = random_data(device);
    resumed_from(what, &data, layer(device), first(), then);
}

/// Two steps of `start` with `optimizer`, then two more with it and with `then` from its record
/// and the layer's.
///
/// The records are loaded only after the uninterrupted run's two steps, as a checkpoint written
/// on the Learner's writer thread is: on CubeCL `into_data` reads lazily, so a record must still
/// hold the values of when it was taken.
fn resumed_from(
    what: &str,
    data: &(Tensor<2>, Tensor<2>),
    start: LoraLinear,
    mut optimizer: ModuleOptimizer,
    then: fn() -> ModuleOptimizer,
) {
    let device = start.lora_a.weight.device();
    let trained = train(start, &mut optimizer, data, 2);
    let record = optimizer.to_record();
    let layer_record = trained.clone().into_record();
    let expected = train(trained.clone(), &mut optimizer, data, 2);
    let loaded = layer(&device).load_record(layer_record);
    let actual = train(loaded, &mut then().load_record(record), data, 2);
    assert_same_adapters(what, &actual, &expected, &trained);
}

#[test]
fn burns_adamw_resumes_the_fused_record() {
    for (name, device) in model_devices() {
        let device = device.autodiff();
        let what = format!("{name}, fused resumed by Burn's AdamW");
        resumed(&what, &device, fused, composed);
    }
}

/// An AMSGrad state (from Burn's `AdamW` with it on) is left to Burn's update, held so that it
/// too leaves the buffers a record reads alone.
#[test]
fn an_amsgrad_record_of_the_fused_adamw_resumes() {
    for (name, device) in model_devices() {
        let device = device.autodiff();
        let data = random_data(&device);
        let mut first = amsgrad();
        let start = train(layer(&device), &mut first, &data, 1);
        let optimizer = fused().load_record(first.to_record());
        let what = format!("{name}, fused with an AMSGrad state");
        resumed_from(&what, &data, start, optimizer, amsgrad);
    }
}

fn amsgrad() -> ModuleOptimizer {
    AdamWConfig::new()
        .with_weight_decay(WEIGHT_DECAY)
        .with_amsgrad(true)
        .init()
}

/// On Flex only: on CubeCL Burn's `AdamW` writes its moments in place while the record's lazy
/// read still points at them, so there its record gets the next steps' values (Burn's, not the
/// fused optimizer's, which leaves a buffer under a read alone).
#[test]
fn the_fused_adamw_resumes_burns_record() {
    let device = Device::flex().autodiff();
    resumed("flex, Burn's AdamW resumed fused", &device, composed, fused);
}
