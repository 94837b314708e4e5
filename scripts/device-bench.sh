#!/usr/bin/env bash
# Runs on the lent GPU machine (device tool), from the repository root, with the release
# bench-kernels binary (built here with --features vulkan) in .bin/ and the Vulkan loader packages
# in .gl/ (both carried, both git-ignored). It unpacks the loader, prints the GPU, the copy
# ceiling through torch, then runs bench-kernels on Vulkan (bf16 if the driver has it, else f16).
set -u -o pipefail
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 - <<'PY'
import torch
x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
s, e = torch.cuda.Event(True), torch.cuda.Event(True); torch.cuda.synchronize(); s.record()
for _ in range(20): y.copy_(x)
e.record(); torch.cuda.synchronize(); ms = s.elapsed_time(e) / 20
print(f"copy ceiling: {2 * x.numel() / ms / 1e9:.2f} TB/s (1 GiB device-to-device, read + write)")
PY
for dtype in bf16 f16; do
  if ./.bin/bench-kernels --backend vulkan --dtype "$dtype" "$@" 2>&1 | grep -v XDG_RUNTIME; then break; fi
done
