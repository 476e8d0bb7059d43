"""Run state that survives a restart: the loop position and box table (saved with accelerate's state),
stop requests (SIGINT/SIGTERM -> a checkpoint), atomic checkpoints, the non-finite-loss watch."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from hub_ccrop.boxes import BoxTable
from hub_ccrop.errors import TrainingInterrupted
from hub_ccrop.views import (
    SkipCounter,
)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint is still usable."""


@dataclass
class TrainState:
    """Loop position and box table, saved with accelerate's state so ``--resume`` continues exactly."""

    boxes: BoxTable
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # batches of the current epoch already trained
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped: SkipCounter = field(default_factory=SkipCounter)  # undecodable pretraining images, by id
    skipped_ids: list[int] = field(default_factory=list)  # all processes' skipped ids, as of the last sync

    def sync_skipped(self, accelerator: Accelerator) -> list[int]:
        """Every process's skipped ids, merged (collective: call it on all processes)."""
        self.skipped_ids = sorted(set(self.skipped_ids) | set(gather_object(self.skipped.ids())))
        return self.skipped_ids

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "boxes": self.boxes.boxes.clone(), "box_metadata": json.dumps(self.boxes.metadata, default=str),
                "history": json.dumps(self.history), "skipped_ids": json.dumps(self.skipped_ids)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.boxes.load_state(state["boxes"], json.loads(state["box_metadata"]))
        self.history = json.loads(state["history"])
        self.skipped_ids = json.loads(state.get("skipped_ids", "[]"))  # absent in older checkpoints
        for sample_id in self.skipped_ids:  # already reported: no second warning after --resume
            self.skipped.add(0, sample_id)


class StopRequest:
    """SIGINT/SIGTERM during training: remembered, acted on after the current step instead of killing the run.

    Checkpoints are collective, so every process must stop at the same step: :meth:`agreed` takes the
    maximum over processes (a rank that got no signal stops with the others).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        # A second signal (a launcher forwards the terminal's Ctrl-C again) must not cut the checkpoint short.
        self.signum = self.signum or signum

    def agreed(self, accelerator: Accelerator, step: int = 0, every: int = 1) -> int:
        """The signal any process received (0 for none), the same number on every process.

        With several processes the flags are reduced only on steps divisible by ``every``: reading the
        reduced flag is a host sync, which a step should not pay each time.
        """
        if accelerator.num_processes == 1:
            return self.signum
        if step % every:
            return 0
        flag = torch.tensor([self.signum], device=accelerator.device)
        return int(accelerator.reduce(flag, reduction="max").item())


def resume_command(out: Path, accelerator: Accelerator) -> str:
    """The exact command that continues this run (the run folder keeps the resolved recipe)."""
    args = f"{shlex.quote(str(out / 'recipe.yaml'))} --output-dir {shlex.quote(str(out))} --resume"
    if accelerator.num_processes == 1:
        return f"hub-ccrop train {args}"
    cpu = "ACCELERATE_USE_CPU=1 " if os.environ.get("ACCELERATE_USE_CPU") else ""
    return (f"{cpu}accelerate launch --multi_gpu --num_processes {accelerator.num_processes} "
            f"-m hub_ccrop train {args}")


def interrupted_at(accelerator: Accelerator, out: Path, state: TrainState, keep: int, signum: int) -> TrainingInterrupted:
    """Save a checkpoint at the current step on every process; the exception carries the resume command."""
    checkpoint = save_checkpoint(accelerator, out, state, keep)
    accelerator.end_training()
    return TrainingInterrupted(signum, str(checkpoint), resume_command(out, accelerator))


class NonFiniteWatch:
    """Notices a NaN/inf loss without a host sync per step: the first bad step is recorded on the device
    and read back only by :meth:`check`, which the loop calls before logging, checkpointing or a pass."""

    def __init__(self, device: torch.device) -> None:
        self.first = torch.zeros(3, device=device, dtype=torch.float64)  # [seen, epoch, step]
        self.value = torch.zeros((), device=device)

    def update(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        new = ~torch.isfinite(loss.detach()) & (self.first[0] == 0)
        where = torch.tensor([1.0, epoch, step], dtype=torch.float64).to(self.first.device, non_blocking=True)
        self.first = torch.where(new, where, self.first)
        self.value = torch.where(new, loss.detach().float(), self.value)

    def check(self, last_checkpoint: Path | None) -> None:
        seen, epoch, step = (int(v) for v in self.first.tolist())
        if seen:
            raise NonFiniteLossError(
                f"loss is {float(self.value)} at epoch {epoch}, step {step}: training stopped. Last good "
                f"checkpoint: {last_checkpoint or 'none yet'} (lower optim.lr or set train.mixed_precision=no, "
                f"then --resume)")


def floats(logs: dict[str, torch.Tensor]) -> dict[str, float]:
    """A step's logs as floats, with one device synchronization."""
    if not logs:
        return {}
    return dict(zip(logs, torch.stack([v.float() for v in logs.values()]).tolist(), strict=True))


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("checkpoint_*"))
    return found[-1] if found else None


def save_checkpoint(accelerator: Accelerator, out: Path, state: TrainState, keep: int) -> Path:
    """accelerate's save_state into a temporary folder, renamed into place: a kill never leaves half a checkpoint."""
    final = out / "checkpoints" / f"checkpoint_{state.global_step:09d}"
    tmp = final.with_name(f".tmp_{final.name}")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    state.sync_skipped(accelerator)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        # Not ProjectConfiguration(total_limit=...): accelerate rotates only the folders it names itself
        # (automatic_checkpoint_naming), which leaves no place for the rename above.
        for old in sorted((out / "checkpoints").glob("checkpoint_*"))[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
