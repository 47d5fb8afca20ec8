#!/usr/bin/env bash
# iNaturalist 2018: ROOT holds train2018.json, val2018.json and the train_val2018/ images.
# iNat's test labels are not public, so val2018 becomes the test split; hold a balanced val
# split out of train (--val-per-class) to tune τ on.
set -euo pipefail
ROOT=${1:?usage: inaturalist.sh INAT_ROOT [RUN]}
RUN=${2:-runs/inat2018}
ltcli train-backbone --run "$RUN" --data "inat:$ROOT" --val-per-class 2 --arch resnet50 \
  --epochs 90 --batch-size 512 --lr 0.2 --weight-decay 1e-4 --workers 16
ltcli extract --run "$RUN" --split all --gpu-decode --workers 16
for m in joint ncm crt lws; do ltcli fit-head --run "$RUN" --method "$m"; done
ltcli tune-tau --run "$RUN" --split val --method tau-norm
ltcli eval --run "$RUN" --split test
