"""Parallelism applied to the plain model after construction: dims and process groups (dims.py), the one
parallelize step (parallelize.py: EP, TP, activation checkpointing), sharded initialisation of the parallelized
meta model (init.py), expert, tensor and pipeline parallelism (stages and schedules). models/ never imports
torch.distributed; this package does."""
