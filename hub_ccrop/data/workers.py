"""DataLoader workers that leave Ctrl-C/SIGTERM to the main process but never outlive its exit.

A training run stops on SIGINT/SIGTERM after the current step and a checkpoint; a cluster signals every
process of the job, so the workers must not die of that signal while the main process still needs them
(torch turns a dead worker into an error in the main process). They ignored both signals for good, and
that hung a failing run: the exception's traceback keeps the run, its persistent DataLoader and so its
workers alive until the interpreter exits, where multiprocessing's exit handler terminates the daemon
workers with SIGTERM and joins them, forever, since they ignore it.

:data:`worker_init` (a DataLoader ``worker_init_fn``) keeps SIGINT ignored and turns SIGTERM into
"exit now" once the main process has begun to exit (a flag in shared memory, set by an ``atexit``
handler that runs before multiprocessing's own), and into nothing before that.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing.util  # noqa: F401  (its exit handler is registered first, so ours runs before it)
import os
import signal
from typing import Any

import torch

__all__ = ["end_workers", "worker_init"]

# 1 once the main process is exiting; shared with the workers (inherited on fork, passed on spawn).
_MAIN_EXITING = torch.zeros((), dtype=torch.uint8).share_memory_()


@atexit.register
def _main_is_exiting() -> None:
    _MAIN_EXITING.fill_(1)


def _init_worker(main_exiting: torch.Tensor, worker_id: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_sigterm(signum: int, frame: Any) -> None:
        if main_exiting.item():  # multiprocessing's exit handler terminating its daemon children
            os._exit(0)  # the main process is gone in a moment: nothing to flush or hand back

    signal.signal(signal.SIGTERM, on_sigterm)


worker_init = functools.partial(_init_worker, _MAIN_EXITING)


def end_workers(processes: list[Any]) -> None:
    """Stop these DataLoader workers now, for a main process about to ``os._exit`` (which skips the exit
    handlers that would stop them): they take the SIGTERM once the exiting flag is set."""
    _main_is_exiting()
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=2)
