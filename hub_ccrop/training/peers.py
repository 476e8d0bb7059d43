"""A failure in one process ends every process of the run within seconds (issue 24).

The other processes are usually blocked in a collective that waits for the failed one: NCCL never notices
that a peer is gone, and gloo notices only once the failed process has exited, which a slow or hung exit
(a tracker flushing, DataLoader workers, a stuck thread) delays until its 30-minute timeout. So the failing
process posts its error in the launch's key-value store (the one that set up the process group, which a
launcher such as torchrun keeps outside the workers) and a watcher thread in every process, which runs
while its main thread is blocked, sees the post, says so in one line and exits non-zero.

A clean stop (Ctrl-C/SIGTERM: ``TrainingInterrupted``) is not a failure: every process stops at the same
step and saves a checkpoint together, as before.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist

from hub_ccrop.data import workers
from hub_ccrop.errors import TrainingInterrupted

__all__ = ["PeerFailureWatch", "peer_failures_end_the_run"]

POLL_S = 0.5  # how often the watcher looks for a post
GRACE_S = 2.0  # a process failing itself at the same moment reports its own error instead
_RUNS = itertools.count()  # one key per training run of this process (every process runs the same ones)


class PeerFailureWatch:
    """Posts this process's failure and watches for the others'; a no-op without a process group's store."""

    def __init__(self, store: Any, rank: int, run: int, on_peer_failure: Any = None) -> None:
        self.store, self.rank = store, rank
        self.prefix = f"hub_ccrop/run{run}/failed"
        self.on_peer_failure = on_peer_failure or _exit_now
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_process_group(cls) -> PeerFailureWatch | None:
        """The watch of this run's process group; None in a single process or without a reachable store."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        try:  # private, but the only handle on the store the launcher set up; without it: no watch
            store = dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 - a process group without a store (e.g. a custom backend)
            return None
        return cls(store, dist.get_rank(), next(_RUNS))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="hub_ccrop-peer-failures", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()

    def post(self, err: BaseException) -> None:
        """Tell the other processes that this one failed (its error in one line)."""
        self.stop()
        with contextlib.suppress(Exception):  # the store already gone: the others learn it from the launcher
            self.store.set(self.prefix, f"process {self.rank} failed: {one_line(err)}")

    def _watch(self) -> None:
        while not self._done.wait(POLL_S):
            try:
                if not self.store.check([self.prefix]):
                    continue
                message = self.store.get(self.prefix).decode()
            except Exception:  # noqa: BLE001 - store gone: the launcher is ending the run anyway
                return
            if self._done.wait(GRACE_S):  # this process failed too, or finished: its own path reports
                return
            self.on_peer_failure(self.rank, message)
            return


def one_line(err: BaseException) -> str:
    """``Type: first line``, and the last line too when there are more: a DataLoader worker's error reads
    "Caught RuntimeError in DataLoader worker process 0." first and ends with the worker's own error."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or [""]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return f"{type(err).__name__}: {text[:400]}"


def _exit_now(rank: int, message: str) -> None:
    """End this process now, from the watcher thread: the main thread may be blocked in a collective."""
    print(f"rank {rank}: stopping because {message} (the last checkpoint stays resumable)", file=sys.stderr,
          flush=True)
    workers.end_workers(multiprocessing.active_children())
    os._exit(1)


@contextlib.contextmanager
def peer_failures_end_the_run() -> Iterator[None]:
    """Around a multi-process training run: a failure here is posted, one elsewhere ends this process."""
    watch = PeerFailureWatch.for_process_group()
    if watch is None:
        yield
        return
    watch.start()
    try:
        yield
    except (TrainingInterrupted, KeyboardInterrupt):  # a clean, agreed stop (or Ctrl-C): not a failure
        raise
    except BaseException as err:
        watch.post(err)
        raise
    finally:
        watch.stop()
