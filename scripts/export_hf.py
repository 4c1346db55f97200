"""Convert a training checkpoint to a Hugging Face DeepseekV3 directory, or (``--import``) back to a .pt.

    # torch.distributed.checkpoint directory (the trainer's format) or a plain state_dict .pt -> HF directory
    python scripts/export_hf.py CHECKPOINT --config run/config.yaml --out hf_model [--dtype bfloat16] \
        [--max-shard-size 5GB]     # a DCP checkpoint is streamed: one tensor and one shard in memory
    # HF directory -> plain state_dict .pt (+ model.yaml beside it, usable as --config)
    python scripts/export_hf.py --import hf_model --out model.pt
    # what a released DeepSeek-V3 / Kimi K2 (model_type kimi_k2) config.json maps to, without reading weights
    python scripts/export_hf.py --import /models/Kimi-K2-Base --print-config

``--config`` is the run's YAML (its ``model`` section is used); by default the ``config.yaml`` that
launch/checkpoint/ writes into each step directory (or one in the parent) is used. The model weights are the
keys of ``model.state_dict()``, stored at top level (launch/checkpoint/) or under a ``model.`` / ``model/``
prefix; every other key (optimizer state, meta, extra) is ignored.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configs import DataConfig, JobConfig, dump_config, load_config  # noqa: E402
from models import ModelConfig, Transformer  # noqa: E402
from models.hf_interop import (ShardWriter, _zero_shared_keys, expected_shapes, export_hf, from_hf_config,  # noqa: E402
                               hf_items, import_hf, read_hf_config, write_hf_config)

_PREFIXES = ("", "model.", "model/")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def find_config(ckpt: Path) -> Path:
    base = ckpt if ckpt.is_dir() else ckpt.parent
    for cand in (base / "config.yaml", base.parent / "config.yaml"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"no config.yaml next to {ckpt} or in its parent: pass --config RUN/config.yaml")


def _pick_prefix(names: set[str], wanted: list[str], where: Path) -> str:
    for prefix in _PREFIXES:
        if all(prefix + k in names for k in wanted):
            return prefix
    missing = [k for k in wanted if k not in names][:5]
    raise ValueError(f"{where}: model weights not found (tried prefixes {list(_PREFIXES)}; e.g. missing {missing}); "
                     "does --config match the checkpoint?")


def load_training_weights(ckpt: Path, cfg: ModelConfig) -> Transformer:
    """Our model with the weights of a DCP directory or a .pt state dict (shapes checked against ``cfg``)."""
    model = Transformer(cfg)
    state = model.state_dict()
    if ckpt.is_dir():
        import torch.distributed.checkpoint as dcp

        from launch.checkpoint import read_metadata  # clear errors for unfinished/damaged checkpoints

        meta = read_metadata(ckpt).state_dict_metadata
        prefix = _pick_prefix(set(meta), list(state), ckpt)
        for k, t in state.items():
            saved = tuple(getattr(meta[prefix + k], "size", ()))
            if saved != tuple(t.shape):
                raise ValueError(f"{ckpt}: {prefix + k} has shape {list(saved)}, config expects {list(t.shape)}")
        dcp.load({prefix + k: t for k, t in state.items()}, checkpoint_id=str(ckpt), no_dist=True)  # in place
    elif ckpt.is_file():
        raw = torch.load(ckpt, map_location="cpu", weights_only=True)
        raw = raw.get("model", raw) if isinstance(raw, dict) else raw
        prefix = _pick_prefix(set(raw), list(state), ckpt)
        loaded = {k: raw[prefix + k] for k in state}
        for k, t in loaded.items():
            if t.shape != state[k].shape:
                raise ValueError(f"{ckpt}: {prefix + k} has shape {list(t.shape)}, config expects "
                                 f"{list(state[k].shape)}")
        model.load_state_dict(loaded, strict=True)
    else:
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    return model


def stream_dcp_export(ckpt: Path, cfg: ModelConfig, out: Path, dtype: torch.dtype | None, max_shard_bytes: int) -> None:
    """A DCP checkpoint (any layout: DCP stores global tensors) -> HF shards, one tensor at a time: memory holds
    one tensor and one shard, not the model."""
    import torch.distributed.checkpoint as dcp

    from launch.checkpoint import read_metadata  # clear errors for unfinished/damaged checkpoints

    meta = read_metadata(ckpt).state_dict_metadata
    shapes = expected_shapes(cfg)
    prefix = _pick_prefix(set(meta), list(shapes), ckpt)
    for k, shape in shapes.items():
        saved = tuple(getattr(meta[prefix + k], "size", ()))
        if saved != tuple(shape):
            raise ValueError(f"{ckpt}: {prefix + k} has shape {list(saved)}, config expects {list(shape)}")
    saved_dtype = getattr(getattr(meta[prefix + "embed_tokens.weight"], "properties", None), "dtype", torch.float32)
    write_hf_config(cfg, out, dtype or saved_dtype)
    with ShardWriter(out, max_shard_bytes) as writer:
        for k, shape in shapes.items():
            stored = meta[prefix + k].properties.dtype
            writer.reserve(math.prod(shape) * (dtype or stored).itemsize)
            holder = {prefix + k: torch.empty(shape, dtype=stored)}
            dcp.load(holder, checkpoint_id=str(ckpt), no_dist=True)
            for name, t in hf_items(k, holder[prefix + k], shape, dtype):
                writer.add(name, t)
            del holder
        for name, shape in _zero_shared_keys(cfg).items():
            writer.add(name, torch.zeros(shape, dtype=dtype or saved_dtype))


def parse_size(text: str) -> int:
    """'5GB', '200MB', '512KB' or a number of bytes (powers of 10, as save_pretrained's max_shard_size)."""
    units = {"GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    for unit, scale in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


def job_for(model_cfg: ModelConfig) -> JobConfig:
    """A loadable job config: this model, every other section at its defaults (seq_len capped to the model)."""
    return JobConfig(model=model_cfg, data=DataConfig(seq_len=min(DataConfig.seq_len, model_cfg.max_seq_len)))


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", help="training checkpoint (DCP dir or .pt), or with --import an HF directory")
    p.add_argument("--out", help="HF directory to write, or with --import the .pt file")
    p.add_argument("--config", help="run config.yaml (default: next to the checkpoint)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="weight dtype in the HF files (default: as saved)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: %(default)s)")
    p.add_argument("--import", dest="do_import", action="store_true", help="HF directory -> .pt")
    p.add_argument("--print-config", action="store_true",
                   help="with --import: print the model section the HF config.json maps to and exit (no weights read)")
    args = p.parse_args(argv)
    if args.do_import and args.print_config:
        print(dump_config(job_for(from_hf_config(read_hf_config(args.src))),
                          header=f"model section for {args.src}").split("\noptim:")[0])
        return Path(args.src)
    if not args.out:
        p.error("--out is required (except with --import --print-config)")
    src, out = Path(args.src), Path(args.out)
    if args.do_import:
        model = import_hf(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), out)
        cfg_path = out.with_suffix(".yaml")
        cfg_path.write_text(dump_config(job_for(model.cfg), header=f"model imported from {src}"))
        print(f"wrote {out} and {cfg_path}")
        return out
    cfg = load_config(args.config or find_config(src)).model
    if src.is_dir():  # DCP: streamed
        stream_dcp_export(src, cfg, out, _DTYPES.get(args.dtype), parse_size(args.max_shard_size))
    else:
        export_hf(load_training_weights(src, cfg), out, dtype=_DTYPES.get(args.dtype),
                  max_shard_bytes=parse_size(args.max_shard_size))
    print(f"wrote {out}: config.json and {len(list(out.glob('*.safetensors')))} safetensors file(s)")
    return out


def cli() -> int:
    """``main`` with bad input (a checkpoint, config or HF directory) as one line on stderr and exit 2."""
    from launch.errors import run_reporting_errors

    return run_reporting_errors(lambda: main() and 0, lambda: None)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(cli())
