#!/usr/bin/env bash
# Builds the benchmark binaries for the device machine (x86-64, CUDA kernels through NVRTC) and
# packs them, stripped and xz-compressed, where `device-train.sh` looks: `.bin/` built with
# `--features cuda`, `.bin/fusion/` (training and decoding only: `carry` takes 64 MiB in all) with
# `--features cuda,fusion`. `.bin/` must be ignored (.git/info/exclude) and named in `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
pack() {
  local dir=$1 features=$2; shift 2
  local args=()
  for bin in "$@"; do args+=(--bin "$bin"); done
  CUDARC_CUDA_VERSION=13000 cargo build --release -p apps --features "$features" "${args[@]}"
  mkdir -p "$dir"
  for bin in "$@"; do
    strip -o "$dir/$bin" "target/release/$bin"
    xz -f -T0 "$dir/$bin"
  done
}
if [ "${1:-}" = host ]; then
  # For `device-train.sh host-profile`: bench-train with its symbols (a second full build, as
  # the profile's strip setting is part of every crate's fingerprint), and this machine's perf
  # with the libraries it links, which the device machine's image lacks.
  CARGO_PROFILE_RELEASE_STRIP=none CUDARC_CUDA_VERSION=13000 cargo build --release -p apps \
    --features cuda,fusion --bin bench-train
  mkdir -p .bin/host/perf/lib
  xz -T0 -c target/release/bench-train >.bin/host/bench-train.xz
  cp /usr/bin/perf .bin/host/perf/
  ldd /usr/bin/perf | awk '$3 ~ /^\// && $3 !~ /lib(c|m)\.so/ {print $3}' | xargs -I{} cp -L {} .bin/host/perf/lib/
  tar -C .bin/host -cJf .bin/host/perf.tar.xz perf && rm -r .bin/host/perf
  du -sh .bin/host
  exit
fi
pack .bin cuda bench-kernels bench-layer bench-train bench-decode
pack .bin/fusion cuda,fusion bench-train bench-decode
du -sh .bin
