#!/usr/bin/env bash
# ZeRO-1 MuonClip vs DeepSpeed 0.19.8's ZeRO-1 Muon (benchmarks/deepspeed_muon.py), with deepspeed in a throwaway
# venv made on first use (it needs the package index; deepspeed is never a requirement of this project).
#
#   bash benchmarks/deepspeed_muon.sh                        # 2 ranks, default model (dim 256, 4 layers)
#   NPROC=2 bash benchmarks/deepspeed_muon.sh --dim 512 --iters 8
#   DEEPSPEED_VENV=/path/to/venv bash benchmarks/deepspeed_muon.sh   # reuse a venv
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${DEEPSPEED_VENV:-${TMPDIR:-/tmp}/muonclip-deepspeed-venv}"
if ! "$venv/bin/python" -c "import deepspeed" 2>/dev/null; then
  python -m venv --system-site-packages "$venv"  # sees this environment's torch, adds deepspeed on top
  DS_BUILD_OPS=0 "$venv/bin/pip" install -q "deepspeed==0.19.8"
fi
OMP_NUM_THREADS=1 TORCHDYNAMO_DISABLE=1 "$venv/bin/python" -m torch.distributed.run --standalone \
  --nproc_per_node="${NPROC:-2}" "$here/deepspeed_muon.py" "$@"
