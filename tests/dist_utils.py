"""Run a function in N gloo processes on CPU and surface worker failures in the parent test.

The workers are forked from one forkserver that imported torch and the project once (``PRELOAD``), instead of
spawned interpreters that import them again (~3.5 s of CPU per worker pair, ~110 process groups in the suite). A
forked worker starts with the server's environment, so each call sends the caller's ``os.environ`` and the worker
adopts it before the test's function runs. What the libraries read when they load (OMP_NUM_THREADS,
ATEN_CPU_CAPABILITY, MKL_*, ONEDNN_*) comes from the environment of the first call of the pytest process: set those
for the whole run, not inside a test. The workers of one server share its hash seed (torchrun's ranks each get their
own)."""
from __future__ import annotations

import os
import socket
import sys
import traceback
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# imported once by the forkserver (nothing is run: no threads, no process group, no device state before the fork)
PRELOAD = ["torch", "torch.distributed", "torch.distributed.pipelining", "launch.trainer", "parallel.plan",
           "tests.audit", "tests.test_train"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the server starts, i.e. at the first call
    return ctx


def _worker(rank: int, world_size: int, port: int, env: dict[str, str], fn: Callable, args: tuple, errq) -> None:
    os.environ.clear()
    os.environ.update(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        fn(rank, world_size, *args)
        dist.barrier()
    except BaseException:  # noqa: BLE001 - forwarded to the parent
        errq.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # the work is done and its results written: leave without the interpreter's teardown, where gloo's
    # destructors of groups still referenced (a DeviceMesh's) aborted a worker (SIGABRT) in about 1 of 7 full runs
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` processes with an initialised gloo group.

    ``fn`` must be importable (module level). Results should be written to files (e.g. under pytest's
    tmp_path passed in ``args``) and checked by the parent.
    """
    ctx = _context()
    errq = ctx.SimpleQueue()
    port, env = free_port(), dict(os.environ)
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, env, fn, args, errq))
             for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    errors = []
    while not errq.empty():
        errors.append(errq.get())
    for p in procs:
        if p.is_alive():
            p.kill()
            errors.append((-1, f"process {p.pid} timed out"))
    if errors:
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors))
        raise RuntimeError(f"distributed worker failed:\n{msg}")
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"distributed workers exited with codes {bad}")
