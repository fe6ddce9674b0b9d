#!/usr/bin/env bash
# The GPU checks, in one run on a CUDA machine (CI has none). Default stages, in this order: the
# CUDA tests; issue 14's training step against open_clip (ViT-B/32 bf16 at batch 512 with patch
# dropout 0.5/0.75 rows and peak memory, ViT-L/14 bf16 at batch 128); the demo trained on the GPU;
# torch.compile on CUDA (last: its cold compilation is the least predictable). STAGES="..." picks
# others: bench_vitb32 / bench_vitl14 (inference against open_clip and transformers) and step_32k
# (the paper's 32,768-pair step) were measured on 2026-11-28 (benchmarks/results_gpu.md). Each
# stage has its own time limit and log under $OUT (default ./gpu-check), so a slow stage costs only
# itself; the default limits (100+120+90+75+150 = 535 s) and the start-up (about 15 s) fit one
# device call of 600 s, and BUDGET (default 560 s from the script's start) cuts any stage short, or
# skips it, so the whole script ends inside it even when the start-up or a stage's kill runs long.
#
# Needs beside the repo (the machine has python3 with torch+CUDA, torchvision, timm, regex,
# safetensors, tqdm, numpy, pillow, pytest, transformers, huggingface-hub, but no network):
#   .whl/      wheels of what it lacks: ftfy (clipforge's tokenizer), its wcwidth, open_clip_torch
#   .devdata/data-64px   the demo dataset (demo and step_32k; the machine cannot build it)
# Build both here, in the repo root, from the current tree. Sizes (2026-12-02): .whl 2.3 MB,
# .devdata 27 MB (41 MB on disk: 7,222 small files); with the tracked files (16 MB) 45 MB in all,
# 59 MB by `du -sh`, under the 64 MiB a call carries:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       ftfy==6.3.1 wcwidth==0.9.4 open_clip_torch==3.3.0
#   /work/venv-dev/bin/python -m clipforge.cli demo --prepare-only   # idempotent: the current format
#   mkdir -p .devdata && cp -r ~/.cache/clipforge/demo/data-64px .devdata/
# .whl/ and .devdata/ are git-ignored (.gitignore), so they travel only when the device tool's
# `carry` names them. The call (timeout_s 600: the script ends by BUDGET, about 565 s at most):
#   run(command="bash tools/gpu_check.sh", carry=[".whl", ".devdata"], timeout_s=600)
# $OUT is the tool's folder that comes back (8 files at most: the default stages write 6). Then
# `rm -rf .whl .devdata`. A session's device time (15 minutes, the start included) allows no rerun.
set -u
OUT=${OUT:-gpu-check}
BUDGET=${BUDGET:-560}  # seconds from the script's start by which every stage has ended
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
else
    echo "WARNING: no .whl/*.whl (carry .whl): clipforge needs ftfy, the training stages open_clip_torch"
fi
[ -f .devdata/data-64px/manifest.json ] || echo "WARNING: no .devdata/data-64px (carry .devdata): demo and step_32k will fail"
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
stage() {  # stage NAME SECONDS COMMAND...: run with a limit (cut to what BUDGET leaves), log to $OUT/NAME.log, print its tail
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS - 5))  # 5 s for timeout's kill of a stage that ignores SIGTERM
    if [ "$left" -lt 20 ]; then
        echo "=== $name: skipped, ${left}s left of BUDGET=${BUDGET}s"
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "=== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "=== $name: exit $? in $((SECONDS - start)) s"
    tail -n 25 "$OUT/$name.log" | tr '\r' '\n' | tail -n 25 | cut -c1-400  # progress bars redraw with \r
}
timeout 30 nvidia-smi -L
timeout 120 python3 -c "
import sys, torch
assert torch.cuda.is_available(), 'torch sees no CUDA device'
import clipforge
print(sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name(), 'clipforge', clipforge.__version__)
try:
    import open_clip
    print('open_clip', open_clip.__version__)
except ImportError as error:
    print('WARNING: open_clip missing, the training and bench stages will fail:', error)
try:  # a dataset of another format would make the demo try to rebuild it (no network)
    import json
    from clipforge.demo.dataset import DemoDataConfig, _fingerprint
    saved = json.load(open('.devdata/data-64px/manifest.json')).get('fingerprint')
    if saved != _fingerprint(DemoDataConfig()):
        print('WARNING: .devdata/data-64px is not the current demo data format: rebuild it with --prepare-only')
except Exception as error:
    print('WARNING: demo data not checked:', error)
" || { echo "pre-flight failed: no stage run"; exit 1; }

STAGES=${STAGES:-"cuda_tests train_vitb32 train_vitl14 demo train_compile"}
for name in $STAGES; do
    case $name in
    cuda_tests) stage cuda_tests 100 python3 -m pytest -q -p no:cacheprovider --durations=5 -m gpu tests/test_cuda.py \
        tests/test_train_loop.py ;;
    train_vitb32) stage train_vitb32 120 python3 benchmarks/bench_train.py --model ViT-B/32 --device cuda \
        --precision bf16 --batch 512 --rounds 15 --warmup 5 --patch-dropout 0.5 0.75 ;;
    train_vitl14) stage train_vitl14 90 python3 benchmarks/bench_train.py --model ViT-L/14 --device cuda \
        --precision bf16 --batch 128 --rounds 7 --warmup 3 --no-memory ;;
    train_compile) stage train_compile 150 python3 benchmarks/bench_train.py --model ViT-B/32 --device cuda \
        --precision bf16 --batch 512 --rounds 9 --warmup 3 --compile --no-memory ;;
    demo) rm -rf /tmp/demo-cuda  # a warm machine's earlier run there would only be evaluated again
        stage demo 75 python3 -m clipforge.cli demo --device cuda --minutes 0.5 --data-dir .devdata/data-64px \
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
