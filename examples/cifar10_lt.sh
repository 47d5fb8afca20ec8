#!/usr/bin/env bash
# CIFAR-10-LT from an ImageFolder of CIFAR-10 (e.g. ../shared/data/cifar10 with train/ and test/).
#   bash examples/cifar10_lt.sh [DATA] [RUN] [more train-backbone options, e.g. --compile on a GPU]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DATA=${1:-../shared/data/cifar10}
RUN=${2:-runs/cifar10-lt}
shift 2 || true
ltcli train-backbone --config "$HERE/cifar10_lt.toml" --run "$RUN" --data "imagefolder:$DATA" "$@"
ltcli extract --run "$RUN" --split all
for m in joint ncm crt lws; do ltcli fit-head --config "$HERE/cifar10_lt.toml" --run "$RUN" --method "$m"; done
for m in tau-norm logit-adjust; do ltcli tune-tau --run "$RUN" --method "$m" --plot --many 1000 --few 200; done
ltcli eval --run "$RUN" --split test --plot --many 1000 --few 200
