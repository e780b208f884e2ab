#!/usr/bin/env bash
# Builds harness with the candle backend's CUDA support (its `cuda` feature) into target/cuda/release/:
# the binary and every plugin, the backend able to run on the CPU or a GPU.
#
#   scripts/build-cuda.sh [COMPUTE_CAP]      # e.g. 90 for H100/H200, 80 for A100 (default 90)
#
# With `nvcc` on PATH the system toolkit is used. Without it, CUDA 13.0's compiler, headers and
# libraries come from NVIDIA's pip wheels (pinned below), unpacked under target/cuda-toolkit:
# enough to compile candle's kernels on a machine with no GPU and no toolkit. It must be 13.0 to
# 13.4 (what cudarc accepts), and the GPU's driver must be at least as new as the toolkit.
#
# Then, e.g.
#   target/cuda/release/harness eval --device cuda --task addition
# The GPU machine needs the CUDA driver plus CUDA 13's libcudart, libcublas and libcurand where the
# dynamic loader finds them (LD_LIBRARY_PATH); see README.md.
set -euo pipefail

cap=${1:-${CUDA_COMPUTE_CAP:-90}}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if command -v nvcc >/dev/null 2>&1; then
    echo "using the system CUDA toolkit: $(command -v nvcc)"
    CUDA_COMPUTE_CAP=$cap cargo build --release --workspace --features backend-candle/cuda --target-dir target/cuda
    exit 0
fi

tk=$root/target/cuda-toolkit
cuda=$tk/nvidia/cu13
if [ ! -x "$cuda/bin/nvcc" ]; then
    echo "no nvcc on PATH: fetching CUDA 13.0 from pip wheels into $tk"
    mkdir -p "$tk/wheels"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tk/wheels" \
        nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
        nvidia-cublas==13.0.0.19 nvidia-curand==10.4.5.25
    for w in "$tk"/wheels/*.whl; do
        python3 -m zipfile -e "$w" "$tk"
    done
    chmod +x "$cuda"/bin/* "$cuda"/nvvm/bin/* 2>/dev/null || true
fi
if [ ! -e "$cuda/lib/libcuda.so" ]; then
    shopt -s nullglob
    # The linker wants unversioned names; the driver library is only linked against (the real
    # one is the GPU machine's), so an empty stand-in with its soname will do.
    for so in "$cuda"/lib/lib*.so.*; do
        base=${so%%.so.*}.so
        [ -e "$base" ] || ln -s "$(basename "$so")" "$base"
    done
    echo 'void harness_cuda_stub(void) {}' > "$tk/stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib/libcuda.so" "$tk/stub.c"
fi

PATH=$cuda/bin:$PATH CUDA_ROOT=$cuda CUDA_PATH=$cuda CUDA_COMPUTE_CAP=$cap \
    LIBRARY_PATH=$cuda/lib${LIBRARY_PATH:+:$LIBRARY_PATH} \
    cargo build --release --workspace --features backend-candle/cuda --target-dir target/cuda
echo "built target/cuda/release/harness and its plugins (CUDA compute capability $cap)"
