#!/usr/bin/env bash
# The GPU check: run when a GPU machine is lent (nothing else needs one). One script, each part under its own
# time limit, results in $OUT (default benchmarks/results/gpu): NCCL init, a bf16 training run (bf16 parameters,
# float32 masters) of configs/small_gpu.yaml for 20 steps on 1 GPU (tokens/s, MFU), a bf16 step under CUDA's sync
# debug mode with the dtype audit and optimizer-state offload, and a float32 step's host syncs counted (the experts'
# loop path: one per MoE layer and micro batch), issue 26's safety checks (PASS/FAIL each: activation offload's
# gradients bitwise under sync debug mode with its peak memory, offloaded optimizer state through a DCP save/load
# staying in its pinned arena, pinned host bytes against the arenas, document masks' memory per T, syncs and flex
# recompilations, the max-logit probe's time against the attention's, the expert path's syncs in bf16 and
# float32), the memory techniques (peak memory, activation
# offload's losses and syncs), the flex-attention max-logit probe against the
# eager reference, the model's attention_impl: flex against SDPA (tests/test_model.py; with a document block mask:
# tests/test_document_mask.py), Newton-Schulz per shape
# (bf16 vs float32), and throughput vs transformers.
# The parts share a budget of BUDGET seconds (600: the issue's 10 minutes on one H100); a part gets at most what is
# left, and the parts after it are skipped with a line once it is spent (BUDGET=1800 runs each to its own limit).
#   bash benchmarks/gpu_check.sh            # <= 10 minutes on one H100/H200
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
BUDGET=${BUDGET:-600}  # the whole check's seconds (issue #26: <= 10 minutes on one H100); a part gets what is left
part() {  # part NAME SECONDS CMD...: run CMD with a time limit, keep its output, record the exit status
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if (( left < 20 )); then log "$name skipped: the ${BUDGET}s budget is spent"; return; fi
  (( limit > left )) && limit=$left
  log "$name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log" >> "$OUT/summary.txt"
  log "$name exit $rc"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt" >> "$OUT/summary.txt"

part nccl 60 torchrun --standalone --nproc_per_node=1 -m benchmarks.gpu_probe nccl

# issue 26 items 1-7, one line each, exit status 1 if any fails (python -m benchmarks.gpu_probe safety --device cpu:
# the CPU dry run)
part safety 240 python -m benchmarks.gpu_probe safety

# 20 steps, 1 GPU, bf16 parameters, the real config (ZeRO-1 falls back to the plain optimizer at world 1); the
# micro batch is cut to fit one device with activation checkpointing on
part train_small_gpu 300 python train.py --config configs/small_gpu.yaml --train.steps=20 --train.log_interval=5 \
  --train.eval_interval=0 --train.ckpt_interval=0 --schedule.warmup_steps=2 --data.grad_accum=1 \
  --train.output_dir="$OUT/small_gpu_run" --logging.wandb_mode=disabled
timeout 60 python -m benchmarks.gpu_probe mfu --config configs/small_gpu.yaml --metrics "$OUT/small_gpu_run/metrics.jsonl" \
  >> "$OUT/summary.txt" 2>&1

# bf16 parameters: no host sync in a step (sync_debug_mode error), GEMM dtypes, offloaded state = same losses;
# float32: the host syncs of a step counted (sync_debug_mode warn) against the experts' loop path's
part bf16 180 python -m benchmarks.gpu_probe bf16
# recompute / FP8 storage / activation offload (pinned buffers, side stream): peak memory vs the planner, step time, same losses
part memory 240 python -m benchmarks.gpu_probe memory
part probe 120 python -m benchmarks.gpu_probe max_logits
# model.attention_impl: flex (flex attention's max scores as the max logits) against SDPA + the float32 probe
part flex_model 300 python -m pytest -q tests/test_model.py tests/test_document_mask.py -k flex_attention
part ns 120 python benchmarks/ns.py --device cuda --config configs/small_gpu.yaml --rounds 5 --out "$OUT/ns.md"
part throughput 150 python benchmarks/throughput_vs_hf.py --device cuda --batch 16 --seq 1024 --dim 1024 \
  --steps 10 --out "$OUT/throughput_vs_hf.md"
log "done; results in $OUT"
