#!/usr/bin/env bash
# The GPU checks, in one run on a CUDA machine (CI has none). Default stages (about 9 minutes at
# most, to fit one device call): the CUDA tests; issue 14's training step against open_clip
# (ViT-B/32 bf16 at batch 512 with patch dropout 0.5/0.75 rows and peak memory, ViT-L/14 bf16 at
# batch 128, and torch.compile on CUDA); the demo trained on the GPU. STAGES="..." picks others:
# bench_vitb32 / bench_vitl14 (inference against open_clip and transformers) and step_32k (the
# paper's 32,768-pair step) were measured on 2026-11-28 (benchmarks/results_gpu.md). Each stage
# has its own time limit and log under $OUT (default ./gpu-check), so a slow stage costs only itself.
#
# Needs beside the repo: .whl/ holding wheels of what the machine lacks (ftfy, wcwidth,
# open_clip_torch), and .devdata/data-64px, a copy of the demo dataset that
# `clipforge demo --prepare-only` builds (the machine has no network to build it).
set -u
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
stage() {  # stage NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, print its tail
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "=== $name: exit $? in $((SECONDS - start)) s"
    tail -n 25 "$OUT/$name.log"
}
nvidia-smi -L
python3 -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name())"

STAGES=${STAGES:-"cuda_tests train_vitb32 train_vitl14 train_compile demo"}
for name in $STAGES; do
    case $name in
    cuda_tests) stage cuda_tests 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda.py \
        tests/test_train_loop.py ;;
    train_vitb32) stage train_vitb32 150 python3 benchmarks/bench_train.py --model ViT-B/32 --device cuda \
        --precision bf16 --batch 512 --rounds 15 --warmup 5 --patch-dropout 0.5 0.75 ;;
    train_vitl14) stage train_vitl14 120 python3 benchmarks/bench_train.py --model ViT-L/14 --device cuda \
        --precision bf16 --batch 128 --rounds 7 --warmup 3 --no-memory ;;
    train_compile) stage train_compile 150 python3 benchmarks/bench_train.py --model ViT-B/32 --device cuda \
        --precision bf16 --batch 512 --rounds 9 --warmup 3 --compile --no-memory ;;
    demo) stage demo 90 python3 -m clipforge.cli demo --device cuda --minutes 0.5 --data-dir .devdata/data-64px \
        --run-dir /tmp/demo-cuda
        cp /tmp/demo-cuda/results.json "$OUT/demo_results.json" 2>/dev/null ;;
    bench_vitb32) stage bench_vitb32 110 python3 benchmarks/bench_models.py --model ViT-B/32 --device cuda \
        --precision fp16 --batch 512 --text-batch 2048 --repeats 10 ;;
    bench_vitl14) stage bench_vitl14 130 python3 benchmarks/bench_models.py --model ViT-L/14 --device cuda \
        --precision fp16 --batch 256 --text-batch 2048 --repeats 5 ;;
    step_32k) stage step_32k 130 python3 benchmarks/bench_train_step_32k.py --device cuda --model ViT-B/32 \
        --precision bf16 --images .devdata/data-64px/images --chunk-size 2048 --threads 8 ;;
    *) echo "unknown stage $name" ;;
    esac
done
true
