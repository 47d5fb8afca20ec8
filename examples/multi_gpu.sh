#!/usr/bin/env bash
# Multi-GPU (one node, N GPUs) with torchrun: DDP training and sharded extraction.
# --batch-size is global; every sampler gives each rank a disjoint share of one stream.
set -euo pipefail
N=${N:-8}
DATA=${1:?usage: multi_gpu.sh DATA_SPEC [RUN]}
RUN=${2:-runs/ddp}
torchrun --nproc-per-node "$N" -m ltcli -- train-backbone --run "$RUN" --data "$DATA" \
  --arch resnet50 --sampling instance --epochs 90 --batch-size 512 --lr 0.2
torchrun --nproc-per-node "$N" -m ltcli -- extract --run "$RUN" --split all --gpu-decode
# the classifier stage is cheap: one process is plenty
ltcli fit-head --run "$RUN" --method crt
ltcli tune-tau --run "$RUN" --split val
ltcli eval --run "$RUN" --split test
# several nodes: torchrun --nnodes M --node-rank R --master-addr HOST --master-port 29500 ...
