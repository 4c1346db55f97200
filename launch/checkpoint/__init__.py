"""Checkpoints with ``torch.distributed.checkpoint`` (DCP), single process or any number of ranks.

Layout under ``<output_dir>/checkpoints/``::

    step_00000100/      .metadata, __<rank>_0.distcp, checksums.json, config.yaml (human-readable copy)
    step_00000200/
    latest              text file: name of the newest complete checkpoint

A checkpoint is written to ``step_XXXXXXXX.tmp`` and renamed when every rank has finished, so a directory
without ``.tmp`` is complete; ``latest`` is replaced atomically; only the last ``keep`` are kept. Every file is
checksummed while it is written and verified before a load (integrity.py); state holding NaN/inf is refused by a
save (``NonFiniteState``) as a load rejects it; ``AsyncSaver`` is the same save with only the staging copy blocking
training, into one host buffer it keeps from save to save (staging.py).

Keys: the model's ``state_dict()`` (FQNs), the optimizer state flattened to ``optim/{fqn}/{state_key}``
(each key written by the rank that owns it), ``meta`` (resolved config, step, world size; bytes) and
``extra/rank{r}`` (bytes: data loader state, RNG states, monitor state of rank r). Tensors sharded by
tensor/expert parallelism are passed in as DTensors by the caller, so DCP stores the global tensors.
"""
from launch.checkpoint.integrity import DamagedCheckpoint, NonFiniteState
from launch.checkpoint.load import (check_compatible, context_changes, load_checkpoint, read_metadata,
                                    verify_checkpoint)
from launch.checkpoint.paths import (CHECKPOINT_SUBDIR, LATEST, checkpoint_root, latest_checkpoint, list_checkpoints,
                                     resolve_resume, step_dir)
from launch.checkpoint.save import AsyncSaver, save_checkpoint
from launch.checkpoint.state import model_state, optimizer_state, rng_state, set_rng_state, shard_views

__all__ = ["AsyncSaver", "CHECKPOINT_SUBDIR", "DamagedCheckpoint", "LATEST", "NonFiniteState", "check_compatible",
           "checkpoint_root", "context_changes", "latest_checkpoint", "list_checkpoints", "load_checkpoint",
           "model_state", "optimizer_state", "read_metadata", "resolve_resume", "rng_state", "save_checkpoint",
           "set_rng_state", "shard_views", "step_dir", "verify_checkpoint"]
