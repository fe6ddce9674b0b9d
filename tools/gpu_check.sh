#!/usr/bin/env bash
# The GPU checks, in one run on a CUDA machine (CI has none): the CUDA tests, model inference vs
# open_clip and transformers under fp16 autocast, the paper's 32,768-pair step for ViT-B/32, and
# the demo trained on the GPU. Each stage has its own time limit and log under $OUT (default
# ./gpu-check), so a slow stage costs only itself.
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

stage cuda_tests 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda.py tests/test_train_loop.py
stage bench_vitb32 110 python3 benchmarks/bench_models.py --model ViT-B/32 --device cuda --precision fp16 \
    --batch 512 --text-batch 2048 --repeats 10
stage step_32k 130 python3 benchmarks/bench_train_step_32k.py --device cuda --model ViT-B/32 --precision bf16 \
    --images .devdata/data-64px/images --chunk-size 2048 --threads 8
stage demo 170 python3 -m clipforge.cli demo --device cuda --minutes 0.5 --data-dir .devdata/data-64px \
    --run-dir /tmp/demo-cuda
cp /tmp/demo-cuda/results.json "$OUT/demo_results.json" 2>/dev/null
stage bench_vitl14 130 python3 benchmarks/bench_models.py --model ViT-L/14 --device cuda --precision fp16 \
    --batch 256 --text-batch 2048 --repeats 5
true
