#!/usr/bin/env bash
# The three kNN indexes side by side on one scale-bench cache (after `python bench/scale.py
# --size SIZE`, which fits the ivf head as heads/knn.pt and the flat one as heads/knn-flat.pt):
# fits an hnsw head, then evaluates hnsw, flat and ivf on test, one after the other, each in
# its own process, with wall seconds and peak RSS from GNU time. Run it on an idle machine.
#   bash bench/knn_indexes.sh [RUN]      # RUN default /tmp/ltcli-scale-imagenet-lt
set -euo pipefail
R=${1:-/tmp/ltcli-scale-imagenet-lt}
t() { /usr/bin/time -f "TIME %e s  RSS %M KB  :: $*" python -m ltcli "$@" > /dev/null; }
t fit-head --method knn --index hnsw --out "$R/heads/knn-hnsw.pt" --run "$R"
t eval --heads "$R/heads/knn-hnsw.pt" --out "$R/reports-knn-hnsw" --run "$R"
t eval --heads "$R/heads/knn-flat.pt" --out "$R/reports-knn-flat2" --run "$R"
t eval --heads "$R/heads/knn.pt" --out "$R/reports-knn-ivf2" --run "$R"
ls -la "$R/heads/knn-hnsw.pt" "$R/heads/knn.pt" "$R/heads/knn-flat.pt" "$R/features/train.h5"
