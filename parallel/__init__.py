"""Parallelism and memory techniques applied to the plain model after construction: dims and process groups
(dims.py), the one parallelize step (parallelize.py: precision, EP, TP, recompute, FP8 storage, activation
offload), sharded initialisation of the parallelized meta model (init.py), expert, tensor and pipeline parallelism
(stages and schedules), the precision policy (precision.py), the model regions the memory techniques act on
(regions.py) and the techniques (recompute.py, fp8_storage.py, activation_offload.py), and the memory and
communication planner (plan.py, plan_activations.py). models/ never imports torch.distributed; this package does."""
