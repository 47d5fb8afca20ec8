#!/usr/bin/env bash
# ImageNet-LT (or Places-LT) from the official list files: `relative/path label` per line.
#   ROOT/                     the ImageNet (or Places-365) images
#   ImageNet_LT_train.txt, ImageNet_LT_val.txt, ImageNet_LT_test.txt
# The val list (20 per class) is a balanced held-out split: tune τ there, report on test.
set -euo pipefail
ROOT=${1:?usage: imagenet_lt.sh IMAGENET_ROOT LISTS_DIR [RUN]}
LISTS=${2:?usage: imagenet_lt.sh IMAGENET_ROOT LISTS_DIR [RUN]}
RUN=${3:-runs/imagenet-lt}
SPEC="list:$ROOT:$LISTS/ImageNet_LT_train.txt,$LISTS/ImageNet_LT_val.txt,$LISTS/ImageNet_LT_test.txt"
ltcli train-backbone --run "$RUN" --data "$SPEC" --arch resnext50_32x4d --sampling instance \
  --epochs 90 --batch-size 512 --lr 0.2 --weight-decay 5e-4 --workers 16
ltcli extract --run "$RUN" --split all --gpu-decode --workers 16
ltcli extract --run "$RUN" --split train --views 4 --out "$RUN/features/train-views.h5"
ltcli fit-head --run "$RUN" --method joint
ltcli fit-head --run "$RUN" --method ncm
ltcli fit-head --run "$RUN" --method crt --features "$RUN/features/train-views.h5"
ltcli fit-head --run "$RUN" --method lws --features "$RUN/features/train-views.h5"
ltcli tune-tau --run "$RUN" --split val --method tau-norm --plot
ltcli eval --run "$RUN" --split test --plot
