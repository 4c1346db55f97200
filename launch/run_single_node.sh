#!/usr/bin/env bash
# One node, N local processes (torchrun --standalone picks a free rendezvous port).
#
#   NPROC=8 CONFIG=configs/small_gpu.yaml launch/run_single_node.sh --parallel.tp=2 --parallel.ep=4
#   NPROC=2 launch/run_single_node.sh --train.device=cpu          # CPU / gloo, configs/tiny.yaml
#
# NPROC: processes (default: number of visible GPUs, else 2). CONFIG: YAML path relative to the repository
# root or absolute (default configs/tiny.yaml). Extra arguments (--section.key=value) go to train.py.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${repo_root}"

if [[ -z "${NPROC:-}" ]]; then
  NPROC=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    NPROC="$(nvidia-smi --list-gpus 2>/dev/null | wc -l)"
  fi
  if [[ "${NPROC}" -lt 1 ]]; then
    NPROC=2
  fi
fi
CONFIG="${CONFIG:-configs/tiny.yaml}"

exec torchrun --standalone --nproc_per_node="${NPROC}" train.py --config "${CONFIG}" "$@"
