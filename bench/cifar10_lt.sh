#!/usr/bin/env bash
# CIFAR-10-LT reproduction (Kang et al. decoupling, on JPEG copies of CIFAR-10):
# ResNet-32, IF = 100, 20 val images per class held out of train, the LDAM recipe
# (200 epochs, lr 0.1, batch 128, wd 2e-4, 5 warm-up epochs, cosine), then every head,
# τ tuned on val, evaluation on test.
#
#   bash bench/cifar10_lt.sh [DATA_ROOT] [RUN_DIR] [extra train-backbone options...]
#   e.g. bash bench/cifar10_lt.sh ../shared/data/cifar10 runs/cifar10-lt --compile
set -euo pipefail
DATA=${1:-../shared/data/cifar10}
RUN=${2:-runs/cifar10-lt}
shift 2 || true
LTCLI=${LTCLI:-ltcli}
EPOCHS=${EPOCHS:-200}
VIEWS=${VIEWS:-0}        # > 0: cRT / LWS train on K augmented views of each train image (official
                         # style; on CIFAR-10-LT 10 views moved cRT / LWS by +0.3 / +0.8 only)
MANY=${MANY:-1000}       # shot-group thresholds sized for CIFAR-10-LT: its 10 classes split
FEW=${FEW:-200}          # 4 / 3 / 3 (the tool's 100 / 20 would leave no few-shot class)

start=$(date +%s)
$LTCLI train-backbone --run "$RUN" --overwrite --data "imagefolder:$DATA" \
  --imbalance-factor 100 --val-per-class 20 --seed 0 --arch resnet32 --sampling instance \
  --epochs "$EPOCHS" --batch-size 128 --lr 0.1 --weight-decay 2e-4 --warmup-epochs 5 "$@"
trained=$(date +%s)
$LTCLI extract --run "$RUN" --split train --split val --split test --overwrite
for m in joint ncm knn; do $LTCLI fit-head --run "$RUN" --method "$m"; done
if [ "$VIEWS" -gt 0 ]; then
  $LTCLI extract --run "$RUN" --split train --views "$VIEWS" --out "$RUN/features/train-views.h5" --overwrite
  for m in crt lws; do $LTCLI fit-head --run "$RUN" --method "$m" --features "$RUN/features/train-views.h5"; done
else
  for m in crt lws; do $LTCLI fit-head --run "$RUN" --method "$m"; done
fi
$LTCLI tune-tau --run "$RUN" --split val --method tau-norm --plot --many "$MANY" --few "$FEW"
$LTCLI tune-tau --run "$RUN" --split val --method logit-adjust --plot --many "$MANY" --few "$FEW"
$LTCLI eval --run "$RUN" --split test --plot --many "$MANY" --few "$FEW"
end=$(date +%s)
echo "wall: train $((trained - start)) s, extract + heads + eval $((end - trained)) s, total $((end - start)) s" >&2
