#!/usr/bin/env bash
# CIFAR-10-LT reproduction (decoupling, on JPEG copies of CIFAR-10) with a named recipe:
# ResNet-32, IF = 100, 20 val images per class held out of train, the LDAM schedule
# (200 epochs, lr 0.1, batch 128, wd 2e-4, 5 warm-up epochs, cosine), then every head,
# τ tuned on val, evaluation on test.
#
#   PRESET=ce|mixup|mixup+las|balanced-softmax bash bench/cifar10_lt.sh [DATA_ROOT] [RUN_DIR] [extra train-backbone options...]
#   e.g. PRESET=mixup bash bench/cifar10_lt.sh ../shared/data/cifar10 runs/cifar10-lt-mixup --compile
#
# The preset is a config file, bench/presets/PRESET.toml: its [train-backbone] section is stage 1,
# its [fit-head.crt] / [fit-head.lws] sections stage 2. TRAIN=0 keeps the run's backbone (mixup+las
# shares mixup's stage 1: copy that run and rerun stage 2 only). RESUME=1 continues a stopped
# stage 1 from its last epoch (`--resume`), then runs stage 2. Images are fingerprinted by their
# bytes (--verify), so a run still resumes after its data folder was copied or restored.
set -euo pipefail
DATA=${1:-../shared/data/cifar10}
RUN=${2:-runs/cifar10-lt}
shift 2 || true
HERE=$(cd "$(dirname "$0")" && pwd)
PRESET=${PRESET:-ce}
CONFIG="$HERE/presets/$PRESET.toml"
LTCLI=${LTCLI:-ltcli}
TRAIN=${TRAIN:-1}
RESUME=${RESUME:-0}
VIEWS=${VIEWS:-10}       # cRT / LWS train on K augmented views of each train image (official style)
MANY=${MANY:-1000}       # shot-group thresholds sized for CIFAR-10-LT: its 10 classes split
FEW=${FEW:-200}          # 4 / 3 / 3 (the tool's 100 / 20 would leave no few-shot class)
[ -f "$CONFIG" ] || { echo "no preset $CONFIG" >&2; exit 2; }

start=$(date +%s)
if [ "$TRAIN" = 1 ]; then
  if [ "$RESUME" = 1 ]; then START=--resume; else START=--overwrite; fi
  $LTCLI train-backbone --run "$RUN" "$START" --verify --config "$CONFIG" --data "imagefolder:$DATA" \
    --many "$MANY" --few "$FEW" "$@"
fi
trained=$(date +%s)
$LTCLI extract --run "$RUN" --split all --overwrite
for m in joint ncm knn; do $LTCLI fit-head --run "$RUN" --method "$m"; done
if [ "$VIEWS" -gt 0 ]; then
  $LTCLI extract --run "$RUN" --split train --views "$VIEWS" --out "$RUN/features/train-views.h5" --overwrite
  HEADS_FEATURES=(--features "$RUN/features/train-views.h5")
else
  HEADS_FEATURES=()
fi
for m in crt lws; do $LTCLI fit-head --run "$RUN" --method "$m" --config "$CONFIG" "${HEADS_FEATURES[@]}"; done
$LTCLI tune-tau --run "$RUN" --split val --method tau-norm --plot --many "$MANY" --few "$FEW"
$LTCLI tune-tau --run "$RUN" --split val --method logit-adjust --plot --many "$MANY" --few "$FEW"
$LTCLI eval --run "$RUN" --split test --plot --many "$MANY" --few "$FEW"
end=$(date +%s)
echo "preset $PRESET, wall: train $((trained - start)) s, extract + heads + eval $((end - trained)) s, total $((end - start)) s" >&2
