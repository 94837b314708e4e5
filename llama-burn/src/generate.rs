use std::ops::ControlFlow;

use burn::config::Config;
use burn::tensor::{DType, Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{KvCache, Llama, LlamaConfig, LlamaError};

/// How the next token is chosen.
#[derive(Config, Debug, PartialEq)]
pub struct SamplingConfig {
    /// 0 picks the most likely token (greedy). Default 0.
    #[config(default = 0.0)]
    pub temperature: f64,
    /// Sample among the k most likely tokens only. Default: all.
    #[config(default = "None")]
    pub top_k: Option<usize>,
    /// Sample among the most likely tokens whose probabilities add up to p. Default: all.
    #[config(default = "None")]
    pub top_p: Option<f64>,
    /// Most tokens generated. Default 256.
    #[config(default = 256)]
    pub max_new_tokens: usize,
    /// Seed of the sampler, for repeatable answers. Default 0.
    #[config(default = 0)]
    pub seed: u64,
}

/// Picks tokens from logits as a [`SamplingConfig`] says.
pub struct Sampler {
    config: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Self {
        let rng = StdRng::seed_from_u64(config.seed);
        Self { config, rng }
    }

    /// The next token from one position's logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let argmax = || {
            logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i as u32)
        };
        if self.config.temperature <= 0.0 {
            return argmax();
        }
        let temperature = self.config.temperature as f32;
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &logit)| (i as u32, logit / temperature))
            .collect();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
        if let Some(k) = self.config.top_k {
            candidates.truncate(k.max(1));
        }
        let max = candidates[0].1;
        let mut probabilities: Vec<f32> = candidates.iter().map(|c| (c.1 - max).exp()).collect();
        let total: f32 = probabilities.iter().sum();
        probabilities.iter_mut().for_each(|p| *p /= total);
        if let Some(top_p) = self.config.top_p {
            let mut mass = 0.0;
            let keep = probabilities
                .iter()
                .position(|p| {
                    mass += p;
                    f64::from(mass) >= top_p
                })
                .map_or(probabilities.len(), |i| i + 1);
            probabilities.truncate(keep);
        }
        let total: f32 = probabilities.iter().sum();
        let mut draw = self.rng.random::<f32>() * total;
        for (candidate, p) in candidates.iter().zip(&probabilities) {
            if draw < *p {
                return candidate.0;
            }
            draw -= p;
        }
        candidates[probabilities.len() - 1].0
    }
}

/// Generates after `prompt` with a KV cache, calling `on_token` with each new token (to stream
/// it, or to stop on a stop string with `ControlFlow::Break`). Stops at the config's EOS token,
/// at `max_new_tokens`, or at the end of the rotary tables. Returns the new tokens.
pub fn generate(
    model: &Llama,
    config: &LlamaConfig,
    prompt: &[u32],
    sampling: SamplingConfig,
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<Vec<u32>, LlamaError> {
    if prompt.is_empty() {
        return Err(LlamaError::Config("the prompt has no tokens".into()));
    }
    if prompt.len() >= model.max_positions() {
        return Err(LlamaError::Config(format!(
            "the prompt has {} tokens; the model takes at most {}",
            prompt.len(),
            model.max_positions()
        )));
    }
    let device = model.model.embed_tokens.weight.device();
    let max_new_tokens = sampling
        .max_new_tokens
        .min(model.max_positions() - prompt.len());
    let mut sampler = Sampler::new(sampling);
    let mut cache = KvCache::new(config);
    let mut input = prompt.to_vec();
    let mut generated = Vec::new();
    while generated.len() < max_new_tokens {
        let tokens: Vec<i64> = input.iter().map(|&t| i64::from(t)).collect();
        let tokens =
            Tensor::<2, Int>::from_data(TensorData::new(tokens, [1, input.len()]), &device);
        let logits = model.forward(tokens, Some(&mut cache));
        let [_, seq, vocab] = logits.dims();
        let last = logits
            .narrow(1, seq - 1, 1)
            .reshape([vocab])
            .cast(DType::F32)
            .into_data()
            .try_into_vec::<f32>()
            .map_err(|err| LlamaError::Config(format!("reading logits: {err:?}")))?;
        let token = sampler.sample(&last);
        if Some(token) == config.eos_token_id {
            break;
        }
        generated.push(token);
        if on_token(token).is_break() {
            break;
        }
        input = vec![token];
    }
    Ok(generated)
}
