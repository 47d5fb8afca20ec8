#!/usr/bin/env bash
# The whole GPU check in one call of the device tool (results land in $OUT):
#   1. train-backbone throughput against a bare loop (bench/train_throughput.py)
#   2. CIFAR-10-LT reproduction (bench/cifar10_lt.sh) on the carried JPEG subset
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
timeout 70 python3 bench/train_throughput.py --data imagefolder:$DATA --imbalance-factor 100 --arch resnet32 \
  --batch-size 512 --amp bf16 --epochs 4 --out "$OUT/train_throughput.json" 2>&1 | tail -5
t0=$(date +%s)
timeout ${CIFAR_LIMIT:-400} bash bench/cifar10_lt.sh $DATA $RUN --compile --workers 16 > "$OUT/cifar10_lt.log" 2>&1
echo "cifar10-lt exit $? wall $(( $(date +%s) - t0 )) s"
grep -E "^epoch (1|50|100|150|200)/" "$OUT/cifar10_lt.log" | cut -c1-150
tail -22 "$OUT/cifar10_lt.log"
cp $RUN/reports/eval-test.json $RUN/run.json "$OUT/" 2>/dev/null
(cd $RUN/reports 2>/dev/null && tar cf "$OUT/reports.tar" *.png *.json)
timeout ${EXTRACT_LIMIT:-60} python3 bench/extract_throughput.py --cifar-root $DATA --jpegs 3000 --workers 16 \
  --out "$OUT/extract_throughput.json" 2>&1 | tail -4
