#!/usr/bin/env bash
# What each stage-2 piece buys, on a finished run of bench/cifar10_lt.sh (its features and
# train-views.h5 already extracted): cRT and LWS re-fitted with and without each piece of the
# mixup+las preset (augmented views, cRT started from the joint classifier, label-aware
# smoothing), each evaluated on test. Stage 2 only: seconds per head on a CPU.
#
#   bash bench/stage2_ablation.sh RUN_DIR [OUT.json]
#
# Heads go to RUN/ablation/, reports to RUN/ablation/reports/; the table is printed (markdown)
# and, with OUT.json, written as JSON.
set -euo pipefail
RUN=${1:?usage: bash bench/stage2_ablation.sh RUN_DIR [OUT.json]}
OUT=${2:-}
LTCLI=${LTCLI:-ltcli}
MANY=${MANY:-1000}
FEW=${FEW:-200}
VIEWS="$RUN/features/train-views.h5"
LAS=(--las-eps-head 0.3 --las-eps-tail 0.0)
[ -f "$VIEWS" ] || { echo "$VIEWS: missing (run bench/cifar10_lt.sh with VIEWS > 0 first)" >&2; exit 2; }
mkdir -p "$RUN/ablation"

fit() {  # NAME METHOD [fit-head options...]
  local name=$1 method=$2; shift 2
  $LTCLI fit-head --run "$RUN" --method "$method" --out "$RUN/ablation/$name.pt" "$@" >/dev/null
  HEADS+=("$RUN/ablation/$name.pt")
}
HEADS=()
fit crt-1view crt
fit crt crt --features "$VIEWS"
fit crt-init-joint crt --features "$VIEWS" --init joint
fit crt-las crt --features "$VIEWS" "${LAS[@]}"
fit crt-init-joint-las crt --features "$VIEWS" --init joint "${LAS[@]}"
fit lws-1view lws
fit lws lws --features "$VIEWS"
fit lws-las lws --features "$VIEWS" "${LAS[@]}"

$LTCLI eval --run "$RUN" --split test --heads "$(IFS=,; echo "${HEADS[*]}")" --many "$MANY" --few "$FEW" \
    --out "$RUN/ablation/reports" --json |
  python3 -c '
import json, sys
heads = json.load(sys.stdin)["heads"]
rows = [{"stage 2": name, **{k: round(100 * h[k], 1) for k in ("overall", "many", "medium", "few")}}
        for name, h in heads.items()]
print("| stage 2 | all | many | medium | few |")
print("|---|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(str(v) for v in r.values()) + " |")
if sys.argv[1]:
    json.dump({"run": sys.argv[2], "rows": rows}, open(sys.argv[1], "w"), indent=1)
' "$OUT" "$RUN"
