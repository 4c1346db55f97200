"""Training runtime used by train.py: the training loop (trainer), LR schedule, checkpoints, metrics/W&B,
post-step hooks, stability monitoring, and the torchrun/SLURM launch scripts. Parallelism lives in parallel/."""
