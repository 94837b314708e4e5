"""The peer of `bench-train`: transformers' LLaMA at LLaMA-2-7B shapes, random N(0, 0.02) weights,
its seven projections per layer packed by bitsandbytes (NF4, double quantization, bf16 compute),
PEFT LoRA r 8 alpha 16 on them (f32 adapters), AdamW, micro-batch 4 x 512 random tokens, bf16,
gradient checkpointing on or off. Prints tokens/s (median step after the warm-up) and torch's
peak reserved memory (`max_memory_reserved`, the counterpart of bench-train's peak).

Runs on the lent GPU machine, where torch, transformers and peft are installed; bitsandbytes
travels unpacked on PYTHONPATH (the wheel less the other CUDA versions' libraries):
`python3 scripts/peer-train.py [--activation-checkpointing] [--steps 10] [--warmup 3] [--layers 32]`
"""

import argparse
import statistics
import time

import bitsandbytes as bnb
import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model

from peer_llama import random_llama_7b

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def quantize_projections(model):
    """Replaces each decoder layer's projections by bitsandbytes' 4-bit linear, packing the
    random bf16 weight on the GPU (what `from_pretrained` with a BitsAndBytesConfig does to a
    checkpoint); the embedding and the head stay bf16."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in PROJECTIONS:
                dense = getattr(parent, name, None)
                if dense is None:
                    continue
                packed = bnb.nn.Linear4bit(
                    dense.in_features,
                    dense.out_features,
                    bias=False,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="meta",
                )
                packed.weight = bnb.nn.Params4bit(
                    dense.weight.data,
                    requires_grad=False,
                    compress_statistics=True,
                    quant_type="nf4",
                ).to("cuda")
                setattr(parent, name, packed)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--activation-checkpointing", action="store_true")
    args = parser.parse_args()

    model = random_llama_7b(args.layers)
    model.config.use_cache = False
    quantize_projections(model)
    torch.cuda.empty_cache()
    model = get_peft_model(
        model,
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=PROJECTIONS),
    )
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    tokens = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    times = []
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if step >= args.warmup:
            times.append(seconds)
        print(f"step {step}: {seconds * 1e3:.0f} ms, loss {loss.item():.4f}", flush=True)

    median = statistics.median(times)
    tokens_per_step = args.batch * args.seq_len
    print(
        f"transformers {transformers.__version__} + bitsandbytes {bnb.__version__} + peft "
        f"{peft.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}: "
        f"{args.layers} layers, batch {args.batch} x {args.seq_len}, activation checkpointing "
        f"{'on' if args.activation_checkpointing else 'off'}: {tokens_per_step / median:.0f} "
        f"tokens/s ({median * 1e3:.0f} ms/step, median of {len(times)}), peak reserved "
        f"{torch.cuda.max_memory_reserved() / 2**30:.3f} GiB, "
        f"{sum(p.numel() for p in trainable):,} trainable parameters"
    )


if __name__ == "__main__":
    main()
