"""Offline pretraining data: embedded public-domain corpus -> packed Megatron-format token shards.

``prepare(out_dir)`` builds (once) train/val .bin/.idx shards, ``TokenShards`` reads them, ``BatchLoader``
yields deterministic, resumable batches and ``val_batches`` the validation windows.
"""
from data.indexed import TokenShards
from data.loader import BatchLoader, val_batches
from data.prepare import Prepared, prepare

__all__ = ["prepare", "Prepared", "TokenShards", "BatchLoader", "val_batches"]
