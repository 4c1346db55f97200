"""How a run ends on an error: one line per failing process, the traceback in a log file, a meaningful exit code.

    error [rank 1]: unknown key 'lrr' in section 'optim' (configs/x.yaml). Did you mean 'lr'? ...

- Bad input (config, data, checkpoint, environment: ``ValueError``, ``OSError`` and their subclasses, raised by
  our code or wrapped by it) exits with code 2; anything else (a runtime failure: non-finite loss, a collective
  that failed, a bug) with code 1; Ctrl-C with 130.
- The full traceback goes to ``<train.output_dir>/logs/rank<k>.log`` once the config is known (appended, with a
  time stamp), and to the console as well with ``--debug`` or ``MUONCLIP_DEBUG=1``.
- ``torch.distributed.checkpoint``'s ``CheckpointException`` derives from ``BaseException`` in torch 2.13, so
  every ``BaseException`` but ``SystemExit`` and ``KeyboardInterrupt`` is handled here.
torchrun prints its own failure summary after our line; that part is torchrun's.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Callable

BAD_INPUT_EXIT, RUNTIME_EXIT, INTERRUPT_EXIT = 2, 1, 130


def rank_prefix() -> str:
    return f" [rank {os.environ.get('RANK', '0')}]" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def first_line(text: str) -> str:
    """The first non-empty line of ``text``, stripped ("" if none)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def one_line(error: BaseException) -> str:
    """The message on one line: its first non-empty line, or the exception's type when it has no message."""
    text = first_line(str(error))
    if not text:
        return type(error).__name__
    return text if isinstance(error, (ValueError, OSError)) else f"{type(error).__name__}: {text}"


def exit_code(error: BaseException) -> int:
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPT_EXIT
    return BAD_INPUT_EXIT if isinstance(error, (ValueError, OSError)) else RUNTIME_EXIT


def write_log(output_dir: str, error: BaseException) -> str | None:
    """Append the traceback to ``<output_dir>/logs/rank<k>.log``; returns its path (None if it cannot be written)."""
    path = os.path.join(output_dir, "logs", f"rank{os.environ.get('RANK', '0')}.log")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
            f.write("".join(traceback.format_exception(error)))
    except OSError:
        return None
    return path


def run_reporting_errors(main: Callable[[], int], output_dir: Callable[[], str | None], debug: bool = False) -> int:
    """``main()``'s exit code, or, when it raises, the one-line report described in the module docstring.
    ``output_dir()`` says where the log goes (None while the config is not loaded)."""
    debug = debug or os.environ.get("MUONCLIP_DEBUG", "") not in ("", "0")
    try:
        return main()
    except SystemExit:
        raise
    except BaseException as error:  # noqa: BLE001 - every failure ends here, reported once
        log = None
        out = output_dir()
        if out:
            log = write_log(out, error)
        if debug:
            traceback.print_exception(error, file=sys.stderr)
        where = f" (traceback: {log})" if log and not debug else ""
        print(f"error{rank_prefix()}: {one_line(error)}{where}", file=sys.stderr, flush=True)
        return exit_code(error)


__all__ = ["run_reporting_errors", "one_line", "exit_code", "write_log", "BAD_INPUT_EXIT", "RUNTIME_EXIT"]
