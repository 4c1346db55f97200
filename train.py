"""Pretrain a DeepSeek-V3 / Kimi-K2 style MoE with the MuonClip optimizer.

Launch commands (run from the repository root):

    # one process (CPU or one GPU); default job on the embedded corpus
    python train.py --config configs/tiny.yaml

    # your own corpus: files/dirs/globs of jsonl/json/parquet/txt or Megatron prefixes, blended by weight
    python train.py --config configs/own_data.yaml
    python train.py --config configs/tiny.yaml \\
        --data.sources='[{path: /data/web, weight: 0.7}, {path: /data/code_text_document, weight: 0.3}]'
    python -m data.preprocess --input /data/web --tokenizer gpt2 --output-prefix /data/tokens/web --workers 16

    # override any config key with --section.key=value (YAML scalar rules)
    python train.py --config configs/tiny.yaml --optim.lr=3e-4 --model.n_layers=2 --train.steps=100

    # one node, 8 GPUs (data parallel, ZeRO-1 MuonClip); add --parallel.tp=2 / --parallel.ep=4 for TP / EP
    torchrun --standalone --nproc_per_node=8 train.py --config configs/small_gpu.yaml

    # pipeline parallel: 2 stages (outermost axis; world = pp * dp * tp), 8 micro batches per step
    torchrun --standalone --nproc_per_node=8 train.py --config configs/small_gpu.yaml --parallel.pp=2 \\
        --parallel.ep=4 --data.grad_accum=8        # --parallel.pp_schedule=interleaved_1f1b --parallel.pp_virtual_stages=2

    # CPU, 2 processes (gloo)
    torchrun --standalone --nproc_per_node=2 train.py --config configs/tiny.yaml --train.device=cpu

    # several nodes: run on every node (same rendezvous endpoint), or use the scripts under launch/
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:29500 \\
        train.py --config configs/small_gpu.yaml

    # resume: automatic from <train.output_dir>/checkpoints/latest (train.resume: auto, the default),
    # or from a given checkpoint directory
    python train.py --config configs/tiny.yaml --train.resume=outputs/tiny/checkpoints/step_00000200

    # start from a released Hugging Face DeepseekV3 / Kimi K2 directory (weights only, any layout)
    python train.py --config configs/my_job.yaml --train.init_from=/models/Moonlight-16B-A3B

    # print the resolved config and exit
    python train.py --config configs/tiny.yaml --print-config
"""
from __future__ import annotations

import argparse
import sys

from configs import dump_config, load_config


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description="MuonClip MoE pretraining. Extra arguments --section.key=value override the YAML config.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", default="configs/tiny.yaml", help="YAML job config (default: %(default)s)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the full traceback too (also MUONCLIP_DEBUG=1); it always goes "
                             "to <train.output_dir>/logs/rank<k>.log")
    args, rest = parser.parse_known_args(argv)
    return args, normalize_overrides(rest)


def normalize_overrides(items: list[str]) -> list[str]:
    """Accept both ``--optim.lr=3e-4`` and ``--optim.lr 3e-4``."""
    out, i = [], 0
    while i < len(items):
        item = items[i]
        if item.startswith("--") and "=" not in item and "." in item and i + 1 < len(items):
            out.append(f"{item}={items[i + 1]}")
            i += 2
        else:
            out.append(item)
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 bad input (config, data, checkpoint, environment), 1 runtime failure, 130 Ctrl-C;
    an error ends with one line per failing process (launch/errors.py)."""
    from launch.errors import run_reporting_errors

    args, overrides = parse_args(argv)
    loaded = {}

    def train() -> int:
        cfg = loaded["cfg"] = load_config(args.config, overrides)
        if args.print_config:
            print(dump_config(cfg))
            return 0
        from launch.trainer import run  # heavy imports only when training
        run(cfg)
        return 0

    return run_reporting_errors(train, lambda: loaded["cfg"].train.output_dir if "cfg" in loaded else None,
                                debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
