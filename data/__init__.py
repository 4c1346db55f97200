"""Pretraining data: sources (files, directories, globs, Megatron prefixes) -> token shards -> sample streams.

``build_datasets`` turns a ``DataConfig`` into training/validation streams (data/sources.py); ``preprocess``
writes Megatron ``.bin/.idx`` shards (also ``python -m data.preprocess``); ``TokenShards`` reads them;
``BatchLoader`` yields deterministic, resumable, data-parallel batches and ``val_batches`` the validation ones.
The names below are imported on first use, so ``python -m data.preprocess`` runs without importing itself twice.
"""
import importlib

_EXPORTS = {"build_datasets": "data.sources", "Datasets": "data.sources", "preprocess": "data.preprocess",
            "TokenShards": "data.indexed", "BlendedSamples": "data.blend", "BatchLoader": "data.loader",
            "packed_samples": "data.loader", "val_batches": "data.loader",
            "val_batch_count": "data.loader", "TextTokenizer": "data.tokenizer",
            "load_tokenizer": "data.tokenizer"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    try:  # a submodule, e.g. data.formats
        return importlib.import_module(f"data.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module 'data' has no attribute {name!r}") from None
