#!/usr/bin/env bash
# CIFAR-10-LT from an ImageFolder of CIFAR-10 (e.g. ../shared/data/cifar10 with train/ and test/).
# Small images are decoded once into memory; on a GPU add --compile for the CUDA-graph step.
set -euo pipefail
DATA=${1:-../shared/data/cifar10}
RUN=${2:-runs/cifar10-lt}
ltcli train-backbone --run "$RUN" --data "imagefolder:$DATA" --imbalance-factor 100 --val-per-class 20 \
  --arch resnet32 --epochs 200 --batch-size 128 --lr 0.1 --weight-decay 2e-4 --warmup-epochs 5
ltcli extract --run "$RUN" --split all
for m in joint ncm crt lws; do ltcli fit-head --run "$RUN" --method "$m"; done
ltcli tune-tau --run "$RUN" --split val --method tau-norm --plot
ltcli tune-tau --run "$RUN" --split val --method logit-adjust --plot
ltcli eval --run "$RUN" --split test --plot --many 1000 --few 200
