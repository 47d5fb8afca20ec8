#!/usr/bin/env bash
# The GPU checks, in stages that each fit one call of the device tool (results land in $OUT):
#
#   bash bench/gpu_session.sh cifar    # CIFAR-10-LT reproduction (bench/cifar10_lt.sh), ~6 min
#   bash bench/gpu_session.sh bench    # heads_speed --device cuda, extract and train throughput, ~4 min
#   bash bench/gpu_session.sh cifar    # again, for "a rerun reproduces within a point"
#
# Carried (ignored folders named in the device tool's `carry`): .whl (the faiss-cpu wheel;
# the device image has no faiss) and .carry/cifar10lt.tar (bench/make_cifar10_lt_subset.py:
# exactly the images a CIFAR-10-LT IF=100 / val-20 run selects, 34 MB).
# Each stage sets itself up, so it also works on a freshly started machine.
set -uo pipefail
STAGE=${1:?usage: gpu_session.sh cifar|bench}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 LTCLI="python3 -m ltcli"
mkdir -p /tmp/d && [ -d /tmp/d/cifar10lt ] || tar xf .carry/cifar10lt.tar -C /tmp/d
nvidia-smi -L; python3 -c "import torch, faiss; print('torch', torch.__version__, 'faiss', faiss.__version__)"
DATA=/tmp/d/cifar10lt

case "$STAGE" in
cifar)
  RUN=/tmp/runs/cifar10-lt-$(date +%s)
  t0=$(date +%s)
  VIEWS=10 MANY=1000 FEW=200 timeout "${CIFAR_LIMIT:-500}" \
    bash bench/cifar10_lt.sh $DATA "$RUN" --compile --workers 16 > "$OUT/cifar10_lt.log" 2>&1
  echo "cifar10-lt exit $? wall $(( $(date +%s) - t0 )) s"
  grep -E "^epoch (1|50|100|150|200)/" "$OUT/cifar10_lt.log" | cut -c1-150
  tail -22 "$OUT/cifar10_lt.log"
  cp "$RUN"/reports/eval-test.json "$RUN"/run.json "$RUN"/metrics.jsonl "$OUT/" 2>/dev/null
  (cd "$RUN"/reports 2>/dev/null && tar cf "$OUT/reports.tar" ./*.png ./*.json ./*.csv)
  ;;
bench)
  timeout 240 python3 bench/heads_speed.py --device cuda --out "$OUT/heads_speed_cuda.json" 2>&1 | tail -12
  timeout 150 python3 bench/extract_throughput.py --cifar-root $DATA --jpegs 8000 --workers 16 \
    --out "$OUT/extract_throughput.json" 2>&1 | tail -6
  timeout 70 python3 bench/train_throughput.py --data imagefolder:$DATA --imbalance-factor 100 --arch resnet32 \
    --batch-size 512 --amp bf16 --epochs 4 --out "$OUT/train_throughput.json" 2>&1 | tail -5
  ;;
*) echo "unknown stage $STAGE (cifar or bench)"; exit 2 ;;
esac
