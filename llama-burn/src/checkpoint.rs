//! Activation checkpointing per decoder layer, as torch's `checkpoint` around each block, with
//! the head and loss taken a chunk of positions at a time.
//!
//! A backward through the whole model keeps every layer's activations (attention scores, MLP
//! intermediates) until it runs, and the f32 logits of every position with them. Here the
//! forward runs without a graph and keeps only each layer's input (the last layer's graph
//! whole: its stage comes next); the backward then runs in stages, each its own small graph
//! freed before the next: the head and loss for one chunk of positions at a time (so the f32
//! logits never exist whole), the last layer, then each layer again from its input, last to
//! first, handing the gradient of its input to the layer before. Parameters are
//! leaves shared by the stages, so their gradients are collected from each stage's backward.

use std::ops::Range;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Distribution, Gradients, Int, Tensor};

use crate::Llama;

/// The loss and parameter gradients of one checkpointed step.
pub struct CheckpointedStep {
    /// The loss, the sum of the chunks' (no graph). The logits are not kept: metrics that
    /// need them would hold `[batch, seq, vocab]` through the layers' backward.
    pub loss: Tensor<1>,
    /// The gradient of every parameter that requires one.
    pub grads: GradientsParams,
}

impl Llama {
    /// Runs a training step's forward and backward with activation checkpointing per decoder
    /// layer. `chunk_loss(logits, positions)` gives the loss of the logits `[batch, chunk,
    /// vocab]` of `positions`; the step's loss is the sum over chunks of `chunk_positions`
    /// positions, and its gradients are those of `grad_scale` times that loss (gradient
    /// accumulation's 1 / steps). The gradients equal those of one backward through the whole
    /// model, up to rounding; LoRA dropout draws the same masks in the forward and in the
    /// recomputation, the device being seeded alike before each layer.
    pub fn checkpointed_backward(
        &self,
        tokens: Tensor<2, Int>,
        chunk_positions: usize,
        grad_scale: f64,
        chunk_loss: impl Fn(Tensor<3>, Range<usize>) -> Tensor<1>,
    ) -> CheckpointedStep {
        let model = &self.model;
        let device = tokens.device();
        // One draw from the device's generator seeds every layer, so the step stays a function
        // of the device's seed.
        let seed = Tensor::<1, Int>::random([1], Distribution::Uniform(0.0, 1e9), &device)
            .into_scalar::<i64>() as u64;
        let layer_seed = |layer: usize| seed.wrapping_add(layer as u64);

        // The forward, without a graph: `no_grad` copies keep dropout active but record nothing.
        // The last layer's graph is kept instead: its backward stage comes right after the
        // head's, so recomputing it would only repeat this forward.
        let mut hidden = model.embed_tokens.clone().no_grad().forward(tokens.clone());
        let mut inputs = Vec::with_capacity(model.layers.len());
        let mut last_stage = None;
        for (index, layer) in model.layers.iter().enumerate() {
            device.seed(layer_seed(index));
            if index + 1 == model.layers.len() {
                // Over its packed weights: dense copies would live through the head's stages,
                // beside every layer's input.
                let input = hidden.detach().require_grad();
                let output = layer.forward(input.clone(), &model.rope, None);
                hidden = output.clone().detach();
                last_stage = Some((input, output));
            } else {
                // Each adapter's hidden goes from this forward to the layer's recomputation.
                let (keeping, taking) = layer.with_kept_hiddens();
                inputs.push((hidden.clone(), taking));
                hidden = keeping.no_grad().forward(hidden, &model.rope, None);
            }
        }

        // The head and the loss, a chunk of positions at a time.
        let mut grads = GradientsParams::new();
        let [_, seq, _] = hidden.dims();
        let chunk_positions = chunk_positions.max(1);
        let mut losses = Vec::new();
        let mut hidden_grads = Vec::new();
        for start in (0..seq).step_by(chunk_positions) {
            let positions = start..seq.min(start + chunk_positions);
            let chunk = hidden
                .clone()
                .narrow(1, start, positions.len())
                .detach()
                .require_grad();
            let chunk_logits = self.logits(model.norm.forward(chunk.clone()));
            let loss = chunk_loss(chunk_logits, positions);
            let mut stage = (loss.clone() * grad_scale).backward();
            hidden_grads.push(take_grad(&chunk, &mut stage));
            collect_grads(&model.norm, &mut stage, &mut grads);
            if let Some(head) = &self.lm_head {
                collect_grads(head, &mut stage, &mut grads);
            } else {
                collect_grads(&model.embed_tokens, &mut stage, &mut grads);
            }
            losses.push(loss.detach());
        }
        let mut grad = Tensor::cat(hidden_grads, 1);

        // The last layer's kept graph, then each layer again from its input, last to first.
        // The backward of `output * grad` seeded with ones gives the input `grad`'s gradient (a
        // `.sum()` would add a reduction of the whole output, 0.18 ms a layer at the 7B's
        // shapes, whose value nothing reads).
        if let (Some((input, output)), Some(layer)) = (last_stage, model.layers.last()) {
            let mut stage = (output * grad).backward();
            collect_grads(layer, &mut stage, &mut grads);
            grad = take_grad(&input, &mut stage);
        }
        // The first layer's input needs a gradient only for trainable embeddings: otherwise its
        // stage skips the input gradients (of its q, k and v projections' products, its norm).
        let embeddings_train = model.embed_tokens.weight.is_require_grad();
        while let Some((input, layer)) = inputs.pop() {
            let index = inputs.len();
            let input_grad = index > 0 || embeddings_train;
            let input = input.detach();
            let input = if input_grad {
                input.require_grad()
            } else {
                input
            };
            device.seed(layer_seed(index));
            // The stage reads each weight twice (the forward again, then the input gradient):
            // dequantized once here, 0.38 GiB at the 7B's shapes while the stage runs. The
            // layer's pullback gives the same as `output * grad` without the output, so without
            // its MLP's last product.
            let layer = layer
                .with_dense_copies(input.dtype())
                .unwrap_or_else(|err| panic!("layer {index}'s weights: {err}"));
            let mut stage = layer
                .pullback(input.clone(), &model.rope, grad.clone())
                .backward();
            collect_grads(&layer, &mut stage, &mut grads);
            if input_grad {
                grad = take_grad(&input, &mut stage);
            }
        }
        if embeddings_train {
            let embedded = model.embed_tokens.forward(tokens);
            let mut stage = (embedded * grad).backward();
            collect_grads(&model.embed_tokens, &mut stage, &mut grads);
        }
        CheckpointedStep {
            loss: Tensor::cat(losses, 0).sum(),
            grads,
        }
    }
}

/// The gradient a stage's backward left for its input leaf.
fn take_grad(input: &Tensor<3>, stage: &mut Gradients) -> Tensor<3> {
    input
        .grad_remove(stage)
        .expect("a stage's input leaf receives a gradient")
}

/// Moves the gradients of `module`'s parameters out of a stage's backward into `into`, adding
/// to what earlier stages gave the same parameter (a head tied to the embedding).
fn collect_grads<M: Module>(module: &M, stage: &mut Gradients, into: &mut GradientsParams) {
    struct Collector<'a> {
        stage: &'a mut Gradients,
        into: &'a mut GradientsParams,
    }
    impl ModuleVisitor for Collector<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if !param.is_require_grad() {
                return;
            }
            let Some(grad) = param.val().grad_remove(self.stage) else {
                return;
            };
            let grad = match self.into.remove::<D>(param.id) {
                Some(earlier) => earlier + grad,
                None => grad,
            };
            self.into.register(param.id, grad);
        }
    }
    module.visit(&mut Collector { stage, into });
}
