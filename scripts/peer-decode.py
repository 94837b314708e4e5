"""The peer of `bench-decode --weights bf16`: transformers' LLaMA at LLaMA-2-7B shapes, random
N(0, 0.02) weights in bf16 on the GPU, batch 1, a 128-token random prompt through the KV cache,
then one token at a time, greedy, each token read back to the host as `bench-decode` does.

Runs on the lent GPU machine (torch and transformers are installed there):
`python3 scripts/peer-decode.py [--new-tokens 129] [--prompt-tokens 128] [--layers 32]`
"""

import argparse
import time

import torch
import transformers

from peer_llama import random_llama_7b


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=129)
    args = parser.parse_args()

    model = random_llama_7b(args.layers).eval()
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated() / 2**30

    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt_tokens), device="cuda")
    times = []
    start = time.perf_counter()
    with torch.inference_mode():
        cache = None  # the model starts its own KV cache on the first call
        tokens = prompt
        for _ in range(args.new_tokens):
            out = model(input_ids=tokens, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = int(out.logits[0, -1].float().argmax())
            times.append(time.perf_counter() - start)
            tokens = torch.tensor([[token]], device="cuda")
    decoded = len(times) - 1
    per_token = (times[-1] - times[0]) / decoded
    print(
        f"transformers {transformers.__version__}, torch {torch.__version__}, bf16 eager, "
        f"{args.layers} layers, batch 1: prefill of {args.prompt_tokens} tokens + first token "
        f"{times[0] * 1e3:.0f} ms, decode {1 / per_token:.1f} tokens/s "
        f"({per_token * 1e3:.2f} ms/token over {decoded} tokens), model {resident:.2f} GiB"
    )


if __name__ == "__main__":
    main()
