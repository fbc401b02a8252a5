#!/usr/bin/env bash
# The checks and timings only a GPU can take, as one call on a lent GPU machine (the device tool runs a
# command in the repository root and returns what is written under $OUT). Every step is bounded by its own
# timeout (120 + 200 + 240 s) so the whole script stays under the device tool's 10 minutes a command; a step that fails or times
# out is reported and the next one still runs.
#
#   1. the CUDA tests: the Triton FPS/KNN kernels against the torch reference, bit for bit (issue 23);
#   2. bench_point_groups.py on CUDA: FPS, KNN and FPS+KNN per backend, the grouping's share of a point
#      recipe's training step (issue 23's table);
#   3. bench_overhead.py on CUDA (bf16 autocast): connected vs plain training step and peak memory (issue 20).
#
# The GPU machine has torch, timm, transformers and Pillow, not numba/open3d/librosa/decord: everything
# here runs from the source tree (PYTHONPATH) without installing the project. Try it on the CPU first at
# tiny sizes: SMALL=1 bash benchmarks/gpu_check.sh (then it runs on whatever device torch finds).
set -u
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu-check}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME SECONDS COMMAND...: runs COMMAND, its output to $out/NAME.txt and to the log
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee -a "$out/log.txt"
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    local rc=$?
    tail -n 40 "$out/$name.txt"
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/log.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$py" -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  "$py" -c "import triton; print('triton', triton.__version__)" 2>&1; } | tee "$out/device.txt"

if "$py" -c "import pytest" 2>/dev/null; then
    step tests 120 "$py" -m pytest -q -p no:cacheprovider tests/test_tokenizers.py -k "cuda or triton or reference"
else  # no pytest there: the Triton kernels against the reference, as the CUDA test does
    step tests 120 "$py" - <<'PY'
import torch
from pathway.tokenizers.point_group import farthest_point_sample, knn
g = torch.Generator().manual_seed(0)
for clouds, points, centres, k in [(4, 8192, 1024, 32), (16, 2048, 128, 32), (3, 5000, 500, 20), (2, 300, 24, 8),
                                   (1, 16, 16, 16)]:
    xyz = torch.rand(clouds, points, 3, generator=g)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = farthest_point_sample(xyz, centres, backend="torch")
    same_fps = torch.equal(ref, farthest_point_sample(xyz.to(device), centres).cpu())
    query = xyz.gather(1, ref[..., None].expand(-1, -1, 3))
    same_knn = all(torch.equal(a, b.cpu()) for a, b in zip(knn(query, xyz, k, backend="torch"),
                                                          knn(query.to(device), xyz.to(device), k)))
    print(f"{clouds} x {points} -> {centres}, k={k} on {device}: FPS == reference {same_fps}, KNN {same_knn}")
PY
fi

if [ "${SMALL:-0}" = 1 ]; then
    step point_groups 300 "$py" benchmarks/bench_point_groups.py --points 1024 --clouds 1 2 --centres 64 \
        --width 32 --depth 1 --heads 1
    step overhead 300 "$py" benchmarks/bench_overhead.py --models vit_tiny_patch16_224 --batch 2 --rounds 1
else
    step point_groups 200 "$py" benchmarks/bench_point_groups.py --torch-compile
    step overhead 240 "$py" benchmarks/bench_overhead.py --models vit_base_patch16_224 --batch 64 --rounds 5
fi
