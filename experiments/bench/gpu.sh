#!/usr/bin/env bash
# The throughput benchmark on one GPU, in one go (sized for under 8 min on an H200; not yet run on one):
# experiments/bench/throughput.py with ResNet-18 at CIFAR size (32 px, cifar_stem) in bf16, for SimCLR, BYOL and
# SwAV multi-crop, both input pipelines (loader workers, augmentation on the device). Images are generated
# (--dataset synthetic: 32 px RGB, nothing to download). Writes throughput<TAG>.{json,md} and gpu_bench.log to
# $OUT if set, else to experiments/results/bench/.
#
#   bash experiments/bench/gpu.sh
#   STEPS=2 WARMUP=1 ROUNDS=1 BATCH=16 WORKERS=1 DEVICE=cpu PRECISION=32-true bash experiments/bench/gpu.sh  # a CPU try
#
# Set-up on a bare machine: this checkout goes first on PYTHONPATH (no install needed for ssl_lightning itself).
# If what it imports is still missing, wheels carried in .whl/ (git-ignored) are installed into /tmp/ssl_site,
# else `pip install -e .` (needs a package index). On a machine with torch and lightning but no index, carry the
# pure-Python rest, downloaded where pip works:
#   python3 -m pip download --no-deps -d .whl jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0 lightly==1.6.0
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-50}            # timed steps per measurement
WARMUP=${WARMUP:-5}           # untimed steps before them
ROUNDS=${ROUNDS:-2}           # interleaved rounds (framework, bare backbone, method on fixed tensors)
BATCH=${BATCH:-512}           # images per step
WORKERS=${WORKERS:-$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))}  # loader workers of the "workers" pipeline
PRECISION=${PRECISION:-bf16-mixed}
METHODS=${METHODS:-simclr byol swav_multicrop}
TAG=${TAG:-_gpu}
DEST=${OUT:-experiments/results/bench}
mkdir -p "$DEST"
LOG="$DEST/gpu_bench.log"
[ "${DEVICE:-}" = cpu ] && export CUDA_VISIBLE_DEVICES=""  # throughput.py uses the GPU whenever torch sees one
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

imports() { "$PYTHON" -c "import torch, torchvision, lightning, jsonargparse, lightly.utils.lars, ssl_lightning.cli" 2>/dev/null; }
if ! imports && compgen -G ".whl/*.whl" >/dev/null; then
    echo "[gpu.sh] installing the wheels of .whl/ into /tmp/ssl_site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ssl_site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/ssl_site"
fi
if ! imports; then
    echo "[gpu.sh] ssl_lightning does not import: pip install -e ."
    "$PYTHON" -m pip install -q --retries 1 --timeout 20 -e . || true
fi
if ! imports; then
    "$PYTHON" -c "import torch, torchvision, lightning, jsonargparse, lightly.utils.lars, ssl_lightning.cli" || true
    echo "error: ssl_lightning's requirements do not import with $PYTHON (above) and could not be installed:" \
         "carry the missing packages as wheels in .whl/ (see the top of this script)" >&2
    exit 1
fi

start=$SECONDS
{
    "$PYTHON" -c "import torch, lightning; print('torch', torch.__version__, '| lightning', lightning.__version__, '|',
        torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU: CPU')"
    # shellcheck disable=SC2086  # METHODS is a list of words
    "$PYTHON" experiments/bench/throughput.py --methods $METHODS --augment workers device \
        --backbone resnet18 --backbone_kwargs '{"cifar_stem": true}' --batch_size "$BATCH" --precision "$PRECISION" \
        --dataset synthetic --dataset_options "{\"size\": $(( BATCH * (WARMUP + STEPS) )), \"image_size\": 32, \"channels\": 3}" \
        --workers "$WORKERS" --steps "$STEPS" --warmup "$WARMUP" --rounds "$ROUNDS" --tag "$TAG" --out "$DEST"
    echo "[gpu.sh] done in $(( SECONDS - start )) s: $DEST/throughput$TAG.json, $DEST/throughput$TAG.md"
} 2>&1 | tee "$LOG"
