#!/usr/bin/env bash
# Runs on the lent GPU machine (device tool), from the repository root, with the release binaries
# built here by scripts/build-device-bins.sh: `--features cuda` (bench-kernels, bench-layer,
# bench-train, bench-decode) xz-compressed in .bin/ (carried, git-ignored), and bench-train and
# bench-decode built with `--features cuda,fusion` in .bin/fusion/. NVRTC comes from the
# machine's CUDA toolkit.
# `kernels`: the CUDA kernels' check against the reference and their timings, and one LoRA layer;
# `train`: QLoRA training at LLaMA-2-7B shapes with activation checkpointing on and off;
# `fusion`: the same training and decoding with Burn's kernel fusion (.bin/fusion/);
# `decode`: batch-1 decoding, 4-bit and bf16, and transformers' bf16 decoding beside it;
# `peer`: the same training through transformers + bitsandbytes + PEFT (scripts/peer-train.py),
# checkpointing on and off; bitsandbytes (not on the machine's image) travels unpacked in .peer/
# (git-ignored, carried): here `pip download --no-deps --only-binary=:all: bitsandbytes==0.50.2`
# and the wheel unzipped into .peer/, less the libraries of the CUDA versions the machine lacks;
# `matvec`: the kernels' timings alone (no check) and torch's dense matrix-vector products;
# `tune`: the 4-bit matmul's products under each TMA tiling of TILINGS (rows,cols,depth,planes;
# see kernels-cubecl/src/matmul.rs), the tuned one first;
# `profile` (`profile-fusion`): every kernel's GPU time in two training steps of 2 layers,
# checkpointing on, through Nsight Compute, without (with) fusion; scripts/kernel-times.py sums them;
# `stalls`: the `wgmma` products' warp stalls per SASS instruction through Nsight Compute;
# `host-profile`: the host's threads over a checkpointed 7B run, sampled by perf with DWARF call
# stacks (`scripts/build-device-bins.sh host` packs .bin/host/); perf.data comes back in $OUT,
# xz-compressed, with the machine's libcuda. Report here after `perf buildid-cache -a` on
# target/release/bench-train and that libcuda, e.g. `perf report -i perf.data --no-children
# --comm DSD-0-0 --sort sym -g none` (main thread: bench-train, Burn fusion's thread: DSU-0-0,
# CubeCL's CUDA server: DSD-0-0).
# Logs go to $OUT (or ./bench-logs).
set -u -o pipefail
out=${OUT:-bench-logs}
mkdir -p "$out"
cuda_lib=$(dirname "$(find /usr/local -name 'libnvrtc.so*' -path '*cuda*' | head -1)")
export LD_LIBRARY_PATH="$cuda_lib:${LD_LIBRARY_PATH:-}"
for f in .bin/*.xz .bin/fusion/*.xz; do [ -e "$f" ] || continue; xz -dkf "$f" && chmod +x "${f%.xz}"; done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
# Each run bounded, so one hang cannot take the whole call.
run() {
  local log="$out/$1.log"; shift
  echo "\$ $*" | tee -a "$log"
  timeout "${BENCH_TIMEOUT:-300}" "$@" >>"$log" 2>&1
  echo "exit $?" >>"$log"
  grep -v '^step [0-9]*:' "$log" | tail -4
}
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(kernels train decode)
for part in "${parts[@]}"; do
  case "$part" in
    kernels)
      run kernels ./.bin/bench-kernels --backend cuda --dtype bf16 --samples 51
      for variant in ours naive dense burn; do
        run layer ./.bin/bench-layer --backend cuda --dtype bf16 --variant "$variant"
      done ;;
    train)
      run train-ckpt ./.bin/bench-train --backend cuda --activation-checkpointing
      run train ./.bin/bench-train --backend cuda ;;
    fusion)
      run train-fusion-ckpt ./.bin/fusion/bench-train --backend cuda --activation-checkpointing
      run train-fusion ./.bin/fusion/bench-train --backend cuda
      run decode-fusion ./.bin/fusion/bench-decode --backend cuda --weights qlora ;;
    decode)
      run decode ./.bin/bench-decode --backend cuda --weights qlora
      run decode ./.bin/bench-decode --backend cuda --weights bf16
      run decode python3 scripts/peer-decode.py ;;
    peer)
      PYTHONPATH=$PWD/.peer run peer python3 scripts/peer-train.py --activation-checkpointing
      PYTHONPATH=$PWD/.peer run peer python3 scripts/peer-train.py ;;
    matvec)
      run matvec ./.bin/bench-kernels --backend cuda --dtype bf16 --skip-check --samples 51
      run matvec python3 scripts/peer-matvec.py ;;
    tune)
      run tune ./.bin/bench-kernels --backend cuda --dtype bf16 --skip-check --tables matmul
      for tiling in ${TILINGS:-1,16,2,16 1,16,4,16 1,16,4,8 2,16,2,8 2,16,4,8 2,16,4,4 2,8,4,8 4,8,4,8 4,8,4,4 2,8,4,16 1,8,2,8 1,8,4,8 1,8,4,16 2,8,2,8 4,8,2,8 2,4,4,16}; do
        KERNELS_CUBECL_TMA_TILING=$tiling run tune ./.bin/bench-kernels --backend cuda --dtype bf16 \
          --skip-check --tables matmul
      done ;;
    profile|profile-fusion)
      bin=.bin; [ "$part" = profile ] || bin=.bin/fusion
      run "$part" ncu --clock-control none --metrics gpu__time_duration.sum --csv \
        --log-file "$out/$part.csv" "./$bin/bench-train" --backend cuda --layers 2 --warmup 1 \
        --steps 1 --activation-checkpointing ;;
    stalls)
      # Where the `wgmma` products' warps wait, instruction by instruction: Nsight Compute's
      # warp-state samples over launches 4 to 10 of the 2-layer checkpointed step (v, o, gate and
      # up with their narrow tiles, down), then each instruction's samples as CSV.
      ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
      run stalls "$ncu" --clock-control none --kernel-name regex:wgmma --launch-skip 3 \
        --launch-count 7 --section SourceCounters --section WarpStateStats --section SpeedOfLight \
        --import-source no -o "$out/stalls" ./.bin/fusion/bench-train --backend cuda --layers 2 \
        --warmup 1 --steps 1 --activation-checkpointing
      "$ncu" -i "$out/stalls.ncu-rep" --page details --csv >"$out/stalls-details.csv" 2>&1
      "$ncu" -i "$out/stalls.ncu-rep" --page source --csv --print-source sass 2>&1 \
        | xz -T0 >"$out/stalls-sass.csv.xz" ;;
    host-profile)
      tar -C .bin/host -xJf .bin/host/perf.tar.xz
      xz -dkf .bin/host/bench-train.xz && chmod +x .bin/host/bench-train
      # The first run fills the kernel cache, so the second's warm-up ends within the delay
      # (~8 s) and the recording holds only timed steps.
      run host-warm ./.bin/host/bench-train --backend cuda --activation-checkpointing --steps 5
      LD_LIBRARY_PATH=".bin/host/perf/lib:$LD_LIBRARY_PATH" run host-profile .bin/host/perf/perf \
        record -F 299 --call-graph dwarf,12288 -D "${HOST_PROFILE_DELAY_MS:-9500}" \
        -o /tmp/perf.data -- ./.bin/host/bench-train --backend cuda --activation-checkpointing \
        --steps 25
      xz -T0 -c /tmp/perf.data >"$out/perf.data.xz"
      xz -T0 -c "$(find / -name 'libcuda.so.*.*' -type f 2>/dev/null | head -1)" >"$out/libcuda.xz" ;;
  esac
done
