"""Pretraining data: sources (files, directories, globs, Megatron prefixes) -> token shards -> sample streams.

``build_datasets`` turns a ``DataConfig`` into training/validation streams (data/sources.py); ``preprocess``
writes Megatron ``.bin/.idx`` shards (also ``python -m data.preprocess``); ``TokenShards`` reads them;
``BatchLoader`` yields deterministic, resumable, data-parallel batches and ``val_batches`` the validation ones.
"""
from data.blend import BlendedSamples
from data.indexed import TokenShards
from data.loader import BatchLoader, packed_samples, val_batches
from data.preprocess import preprocess
from data.sources import Datasets, build_datasets
from data.tokenizer import TextTokenizer, load_tokenizer

__all__ = ["build_datasets", "Datasets", "preprocess", "TokenShards", "BlendedSamples", "BatchLoader",
           "packed_samples", "val_batches", "TextTokenizer", "load_tokenizer"]
