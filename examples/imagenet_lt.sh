#!/usr/bin/env bash
# ImageNet-LT (or Places-LT) from the official list files: `relative/path label` per line.
#   ROOT/                     the ImageNet (or Places-365) images
#   LISTS/ImageNet_LT_{train,val,test}.txt
# The val list (20 per class) is a balanced held-out split: tune τ there, report on test.
#   bash examples/imagenet_lt.sh ROOT LISTS [RUN] [more train-backbone options]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=${1:?usage: imagenet_lt.sh IMAGENET_ROOT LISTS_DIR [RUN]}
LISTS=${2:?usage: imagenet_lt.sh IMAGENET_ROOT LISTS_DIR [RUN]}
RUN=${3:-runs/imagenet-lt}
shift 3 || shift $#
SPEC="list:$ROOT:$LISTS/ImageNet_LT_train.txt,$LISTS/ImageNet_LT_val.txt,$LISTS/ImageNet_LT_test.txt"
ltcli train-backbone --config "$HERE/imagenet_lt.toml" --run "$RUN" --data "$SPEC" "$@"
ltcli extract --config "$HERE/imagenet_lt.toml" --run "$RUN" --split all
for m in joint ncm crt lws; do ltcli fit-head --run "$RUN" --method "$m"; done
ltcli fit-head --run "$RUN" --method knn --index ivf   # 116k train features: an IVF index
for m in tau-norm logit-adjust; do ltcli tune-tau --run "$RUN" --method "$m" --plot; done
ltcli eval --run "$RUN" --split test --plot
