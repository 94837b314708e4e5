"""The peers' model: transformers' LLaMA at LLaMA-2-7B shapes with random N(0, 0.02) bf16
weights, built on the GPU, as `bench-train` and `bench-decode` build theirs. Imported by
`peer-train.py` and `peer-decode.py` (run from the repository root: `python3 scripts/...`)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def random_llama_7b(layers):
    """The model, seeded, in bf16 on the GPU (torch's default dtype is left bf16 after it)."""
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        initializer_range=0.02,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        return LlamaForCausalLM(config)
