"""Runtime used by train.py: parallel layout (parallel_dims, parallelize), the training loop (trainer),
LR schedule, checkpoints, metrics/W&B, post-step hooks and stability monitoring."""
