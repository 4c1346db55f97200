#!/usr/bin/env bash
# Several nodes: run this once on every node with the same MASTER_ADDR/MASTER_PORT (the c10d rendezvous
# host, normally node 0) and NNODES, and this node's NODE_RANK.
#
#   MASTER_ADDR=node0 MASTER_PORT=29500 NNODES=2 NODE_RANK=0 NPROC_PER_NODE=8 \
#       CONFIG=configs/small_gpu.yaml launch/run_multi_node.sh --parallel.tp=8
#
# World size = NNODES * NPROC_PER_NODE = dp * tp: keep tp <= NPROC_PER_NODE so TP groups stay inside a node
# (tp is the innermost rank axis). With the c10d backend the rendezvous assigns the ranks; NODE_RANK is passed
# for logs and for static setups. Extra arguments (--section.key=value) go to train.py.
set -euo pipefail

: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host (node 0)}"
: "${NNODES:?set NNODES to the number of nodes}"
: "${NODE_RANK:?set NODE_RANK to the index of this node (0..NNODES-1)}"
MASTER_PORT="${MASTER_PORT:-29500}"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
CONFIG="${CONFIG:-configs/small_gpu.yaml}"
RDZV_ID="${RDZV_ID:-muonclip-moe}"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"

exec torchrun \
  --nnodes="${NNODES}" \
  --node_rank="${NODE_RANK}" \
  --nproc_per_node="${NPROC_PER_NODE}" \
  --rdzv_id="${RDZV_ID}" \
  --rdzv_backend=c10d \
  --rdzv_endpoint="${MASTER_ADDR}:${MASTER_PORT}" \
  train.py --config "${CONFIG}" "$@"
