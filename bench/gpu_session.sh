#!/usr/bin/env bash
# The whole GPU check in one call of the device tool (results land in $OUT):
#   1. CIFAR-10-LT reproduction (bench/cifar10_lt.sh) on the carried JPEG subset
#   2. train-backbone throughput against a bare loop (bench/train_throughput.py)
#   3. extract throughput against its ceilings (bench/extract_throughput.py)
# Carried: .whl (faiss-cpu wheel; the device image has no faiss), .carry/cifar10lt.tar
# (made by bench/make_cifar10_lt_subset.py).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 LTCLI="python3 -m ltcli"
mkdir -p /tmp/d && tar xf .carry/cifar10lt.tar -C /tmp/d
nvidia-smi -L; python3 -c "import torch, faiss; print('torch', torch.__version__, 'faiss', faiss.__version__)"
DATA=/tmp/d/cifar10lt RUN=/tmp/runs/cifar10-lt
t0=$(date +%s)
if ! timeout ${CIFAR_LIMIT:-400} bash bench/cifar10_lt.sh $DATA $RUN --compile --workers 16 > "$OUT/cifar10_lt.log" 2>&1; then
  echo "compiled run failed; eager fallback" | tee -a "$OUT/cifar10_lt.log"
  timeout ${CIFAR_LIMIT:-400} bash bench/cifar10_lt.sh $DATA $RUN --workers 16 >> "$OUT/cifar10_lt.log" 2>&1
fi
echo "cifar10-lt wall $(( $(date +%s) - t0 )) s"
tail -30 "$OUT/cifar10_lt.log"
cp $RUN/reports/eval-test.json $RUN/run.json "$OUT/" 2>/dev/null
(cd $RUN/reports && tar cf "$OUT/reports.tar" *.png *.json 2>/dev/null)
timeout 90 python3 bench/train_throughput.py --data imagefolder:$DATA --imbalance-factor 100 --arch resnet32 \
  --batch-size 512 --amp bf16 --epochs 4 --out "$OUT/train_throughput.json" 2>&1 | tail -6
timeout 120 python3 bench/extract_throughput.py --cifar-root $DATA --jpegs 4000 --workers 16 \
  --out "$OUT/extract_throughput.json" 2>&1 | tail -6
