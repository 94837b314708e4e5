#!/usr/bin/env bash
# Runs on the lent GPU machine (device tool), from the repository root, with the release
# bench-layer binary (built here with --features vulkan) in .bin/ and the Vulkan loader packages
# in .gl/ (both carried, both git-ignored). Prints peak memory and step time of one LoRA layer's
# forward + backward for each variant (one process each), then the same layer in torch + peft
# (and bitsandbytes' Linear4bit, where it is installed) for comparison.
set -u -o pipefail
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
dtype=bf16
./.bin/bench-layer --backend vulkan --dtype bf16 --steps 1 >/dev/null 2>&1 || dtype=f16
for variant in ours naive dense burn; do
  ./.bin/bench-layer --backend vulkan --dtype "$dtype" --variant "$variant" "$@" 2>&1 | grep -v XDG_RUNTIME
done
python3 - <<'PY'
import torch, peft
from torch import nn
def measure(name, make):
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    layer = make()
    x = torch.randn(1, 2048, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize(); base = torch.cuda.memory_allocated()
    loss = layer(x).sum(); torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    loss.backward(); torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(True), torch.cuda.Event(True); s.record()
        layer(x).sum().backward(); e.record(); torch.cuda.synchronize(); times.append(s.elapsed_time(e))
    times.sort()
    print(f"{name}: held for backward {held / 2**20:.1f} MiB, peak allocated {peak / 2**20:.1f} MiB, step {times[5]:.2f} ms")
    del layer, x, loss
cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"])
def dense():
    m = nn.Sequential(nn.Linear(4096, 11008, bias=False)).to("cuda", torch.bfloat16)
    return peft.get_peft_model(m, cfg)
measure(f"torch {torch.__version__} + peft {peft.__version__}, dense bf16 base", dense)
try:
    import bitsandbytes as bnb
    def nf4():
        m = nn.Sequential(bnb.nn.Linear4bit(4096, 11008, bias=False, compute_dtype=torch.bfloat16,
                                            compress_statistics=True, quant_type="nf4")).to("cuda")
        return peft.get_peft_model(m, cfg)
    measure(f"bitsandbytes {bnb.__version__} NF4 + peft", nf4)
except ImportError:
    print("bitsandbytes: not installed on this machine")
PY
