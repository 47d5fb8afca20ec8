#!/usr/bin/env bash
# Chaining through stdout: every command prints the path(s) it wrote and nothing else.
set -euo pipefail
RUN=${1:-ltcli-run}
[ -f "$RUN/backbone.pt" ] || ltcli train-backbone --run "$RUN" --epochs 20 > /dev/null
# extract prints features/train.h5; fit-head reads it from stdin ('-') and prints the head path
ltcli extract --run "$RUN" --split train | ltcli fit-head --run "$RUN" --features - --method crt
# one head per line
for m in lws ncm; do ltcli extract --run "$RUN" --split train | ltcli fit-head --run "$RUN" --features - --method "$m"; done
ltcli extract --run "$RUN" --split val | ltcli tune-tau --run "$RUN" --features - --split val
ltcli extract --run "$RUN" --split test | xargs -I{} ltcli eval --run "$RUN" --features {} --json | python3 -m json.tool | head -20
