#!/usr/bin/env bash
# iNaturalist 2018: ROOT holds train2018.json, val2018.json and the train_val2018/ images.
# iNat's test labels are not public, so val2018 becomes the test split (as in Kang et al.);
# a val split for τ is held out of train (inaturalist.toml: val_per_class).
#   bash examples/inaturalist.sh INAT_ROOT [RUN] [more train-backbone options]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=${1:?usage: inaturalist.sh INAT_ROOT [RUN]}
RUN=${2:-runs/inat2018}
shift 2 || shift $#
ltcli train-backbone --config "$HERE/inaturalist.toml" --run "$RUN" --data "inat:$ROOT" "$@"
ltcli extract --config "$HERE/inaturalist.toml" --run "$RUN" --split all
for m in joint ncm crt lws; do ltcli fit-head --run "$RUN" --method "$m"; done
# 437k train features: an inverted-file index; fit prints its recall@10 and speed-up over exact
# search; where it buys little on your features, `--index flat` (the default) is exact
ltcli fit-head --run "$RUN" --method knn --index ivf
for m in tau-norm logit-adjust; do ltcli tune-tau --run "$RUN" --method "$m"; done
ltcli eval --run "$RUN" --split test
