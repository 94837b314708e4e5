"""Checks `merge` output with transformers (run where torch and transformers are installed, e.g.
the lent GPU machine):

  python3 scripts/check_merged.py MODEL_DIR EXPECTED.safetensors [TOKENIZER_DIR]

MODEL_DIR is a merged checkpoint; EXPECTED holds `input_ids` and the `logits` the adapted model
should give (for the golden tiny LLaMA merged with its golden adapter: the golden adapter's
expected.safetensors, peft's logits). TOKENIZER_DIR, when given, is a folder of tokenizer files
written by `merge` for a GGUF model: AutoTokenizer must load it, render its chat template and
encode as the tokenizers library does. Exits non-zero when a check fails.
"""

import sys

import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer

TOLERANCE = 1e-4

model_dir, expected_path = sys.argv[1], sys.argv[2]
model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
expected = load_file(expected_path)
with torch.no_grad():
    logits = model(expected["input_ids"]).logits
error = (logits - expected["logits"]).abs().max().item()
print(f"transformers {transformers.__version__}: {type(model).__name__} from {model_dir}, "
      f"max abs error vs expected logits {error:.2e} (tolerance {TOLERANCE})")
failed = error > TOLERANCE

if len(sys.argv) > 3:
    tokenizer_dir = sys.argv[3]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    raw = Tokenizer.from_file(f"{tokenizer_dir}/tokenizer.json").encode(
        prompt, add_special_tokens=False).ids
    print(f"{type(tokenizer).__name__}: prompt {prompt!r} -> {ids}")
    print(f"bos {tokenizer.bos_token!r} eos {tokenizer.eos_token!r} pad {tokenizer.pad_token!r}")
    if ids != raw:
        print(f"AutoTokenizer and tokenizer.json disagree: {raw}")
        failed = True
    if tokenizer.decode(ids) != prompt:
        print(f"decode does not give the prompt back: {tokenizer.decode(ids)!r}")
        failed = True

sys.exit(1 if failed else 0)
