#!/usr/bin/env bash
# Builds alexnet with Candle's CUDA backend on a machine with neither a GPU nor a CUDA toolkit.
#
#   scripts/build-cuda.sh        ->  target/cuda-dist/{alexnet, libcudart.so.13}
#                                    target/cuda-carry/{alexnet.xz, libcudart.so.13} (8 MB: what
#                                    goes to a GPU machine; scripts/gpu-check.sh unpacks it)
#
# Environment: CUDA_COMPUTE_CAP (default 90: H100/H200), JOBS (cargo -j, default: all cores).
#
# 1. The CUDA 13.0 compiler pieces come from PyPI (nvcc, nvvm, crt, the runtime, cccl), unpacked
#    into target/cuda-toolkit, which becomes CUDA_HOME (with the lib64 -> lib and libcudart.so
#    links nvcc and the linker look for).
# 2. candle-core's `cuda` feature asks cudarc for `dynamic-linking`, which links libcuda and
#    cuBLAS at build time. A copy of cudarc from the cargo registry, patched in target/ (never
#    committed), turns that into `dynamic-loading`: the driver, cuBLAS and cuRAND are opened at
#    run time, so the binary links on a machine without them. The build runs on a copy of the
#    crate in target/cuda-src with `--config patch...`, so the committed Cargo.lock is untouched.
# 3. `cargo build --release --features cuda` into target/cuda, with rpath $ORIGIN, so the binary
#    needs only libcudart.so.13 beside it (copied into target/cuda-dist with it).
# A cold build takes about 30 minutes on 2 cores (candle-kernels' CUDA sources are most of it).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
cap=${CUDA_COMPUTE_CAP:-90}
toolkit=$root/target/cuda-toolkit
dist=$root/target/cuda-dist

# 1. the toolkit
if [ ! -x "$toolkit/bin/nvcc" ]; then
  wheels=$root/target/cuda-wheels
  mkdir -p "$wheels"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_28_x86_64 -d "$wheels" \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*"
  unpacked=$root/target/cuda-wheels/unpacked
  rm -rf "$unpacked" "$toolkit"
  for whl in "$wheels"/*.whl; do python3 -m zipfile -e "$whl" "$unpacked"; done
  mv "$unpacked/nvidia/cu13" "$toolkit"
  chmod +x "$toolkit"/bin/* "$toolkit"/nvvm/bin/*
  ln -sfn lib "$toolkit/lib64"
  ln -sfn "$(basename "$(ls "$toolkit"/lib/libcudart.so.13* | head -1)")" "$toolkit/lib/libcudart.so"
fi
export CUDA_HOME=$toolkit CUDA_PATH=$toolkit NVCC=$toolkit/bin/nvcc CUDA_COMPUTE_CAP=$cap
export PATH=$toolkit/bin:$PATH CUDARC_CUDA_VERSION=13000
# where the linker finds libcudart (candle-kernels' static kernels need it); an environment
# variable rather than RUSTFLAGS, which would rebuild every crate when changed
export LIBRARY_PATH=$toolkit/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
nvcc --version | tail -2

# 2. cudarc, loading instead of linking, and the copy of the crate it is patched into
src=$root/target/cuda-src
rm -rf "$src" && mkdir -p "$src" && cp -r Cargo.toml Cargo.lock src data "$src/"
cudarc_src=$(cargo metadata --format-version 1 --features cuda 2>/dev/null | python3 -c '
import json, sys
meta = json.load(sys.stdin)
print(next(p["manifest_path"] for p in meta["packages"] if p["name"] == "cudarc").rsplit("/", 1)[0])')
patched=$root/target/cuda-patch/cudarc
marker=$root/target/cuda-patch/.cudarc-loads-not-links # outside the crate: a new file there would rebuild it
if [ ! -e "$marker" ]; then # once: a fresh copy would rebuild Candle
  rm -rf "$patched" && mkdir -p "$(dirname "$patched")" && cp -r "$cudarc_src" "$patched"
  grep -rl 'feature = "dynamic-linking"' "$patched/build.rs" "$patched/src" |
    xargs sed -i 's/feature = "dynamic-linking"/feature = "dynamic-linking-not-used"/g'
  sed -i 's/^dynamic-linking = \[\]/dynamic-linking = ["dynamic-loading"]/' "$patched/Cargo.toml"
  touch "$marker"
fi

# 3. the build
export RUSTFLAGS="-C link-arg=-Wl,-rpath,\$ORIGIN"
(cd "$src" && cargo build --release --features cuda --bin alexnet --target-dir "$root/target/cuda" \
  -j "${JOBS:-$(nproc)}" --config "patch.crates-io.cudarc.path=\"$patched\"")
mkdir -p "$dist"
cp target/cuda/release/alexnet "$dist/alexnet"
strip "$dist/alexnet"
cp -L "$toolkit"/lib/libcudart.so.13 "$dist/"
# the binary holds every CUDA kernel (59 MB); xz brings it under what a device call carries
mkdir -p "$root/target/cuda-carry"
xz -6 -T0 -c "$dist/alexnet" > "$root/target/cuda-carry/alexnet.xz"
cp "$dist/libcudart.so.13" "$root/target/cuda-carry/"
echo "built $dist/alexnet (compute capability $cap); it needs libcudart.so.13 beside it, the NVIDIA driver,"
echo "and cuBLAS/cuRAND on LD_LIBRARY_PATH at run time"
ls -la "$dist"
