#!/usr/bin/env bash
# Checks a CUDA build of harness on a machine with an NVIDIA GPU: the same binary evaluates and
# trains on the CPU and on cuda:0, and the two are compared.
#
#   scripts/device-check.sh BIN_DIR MODEL_DIR OUT_DIR
#
# BIN_DIR   target/cuda/release of scripts/build-cuda.sh (harness and its plugins)
# MODEL_DIR a small HF model folder (the tests' tiny model will do: target/test-tmp/*/model)
# OUT_DIR   where the runs and the comparison go
#
# The loader must find libcuda.so.1 (the driver) and CUDA 13's libcudart, libcublas and libcurand,
# e.g. LD_LIBRARY_PATH=<python venv>/site-packages/nvidia/cu13/lib:/usr/local/nvidia/lib64.
# Exits non-zero when the GPU's losses or answers disagree with the CPU's.
set -euo pipefail

if [ $# -ne 3 ]; then
    echo "usage: $0 BIN_DIR MODEL_DIR OUT_DIR" >&2
    exit 2
fi
bin=$1
model=$2
out=$3
mkdir -p "$out"

# Runs a command with its output in a log; on failure shows the log's end and stops.
logged() {
    local log=$1
    shift
    "$@" > "$log" 2>&1 || { echo "failed: $*" >&2; tail -n 30 "$log" >&2; exit 1; }
}

logged "$out/list.txt" "$bin/harness" list
for device in cpu cuda; do
    rm -rf "$out/eval-$device" "$out/train-$device"
    logged "$out/eval-$device.log" "$bin/harness" eval --device "$device" --model "$model" \
        --task addition --digits 1-3 --n 20 --metric exact-match,levenshtein --out "$out/eval-$device"
    # f32 on both sides: the GPU's portable path has no bf16 products.
    logged "$out/train-$device.log" "$bin/harness" train --device "$device" --model "$model" \
        --task addition --digits 1-3 --examples 48 --micro-batch 8 --lr 1e-3 \
        --train-option compute=f32 --out "$out/train-$device"
done
"$bin/harness" bench train --device cuda --model "$model" --seq-len 64 > "$out/bench-cuda.log" 2>&1 || true

python3 - "$out" <<'EOF'
import csv, json, sys
out = sys.argv[1]

def answers(device):
    with open(f"{out}/eval-{device}/samples.jsonl") as f:
        return {s["id"]: s.get("prediction") for s in map(json.loads, f)}

def losses(device):
    with open(f"{out}/train-{device}/train.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]

cpu, gpu = answers("cpu"), answers("cuda")
differ = sorted(k for k in cpu if cpu[k] != gpu.get(k))
lc, lg = losses("cpu"), losses("cuda")
if not lc or len(lc) != len(lg):
    print(f"MISMATCH: {len(lc)} training steps on the CPU, {len(lg)} on CUDA")
    sys.exit(1)
worst = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(lc, lg))
print(f"answers: {len(cpu)} on the CPU, {len(differ)} differ on CUDA {differ[:5]}")
print(f"losses: {len(lc)} steps; first {lc[0]:.6f} (CPU) vs {lg[0]:.6f} (CUDA), "
      f"last {lc[-1]:.6f} vs {lg[-1]:.6f}; largest relative difference {worst:.2e}")
ok = worst < 1e-2 and len(differ) <= len(cpu) // 20
print("OK" if ok else "MISMATCH")
sys.exit(0 if ok else 1)
EOF
