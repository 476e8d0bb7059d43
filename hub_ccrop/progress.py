"""Run-level progress: after each epoch, one line that stays on screen and goes to the trackers.

    epoch 3/8 (step 96/256) | 331 images/s | 1m05s left, done about 14:32 | next localization after epoch 4

The time left is this session's wall time per step (localization passes, kNN and checkpoints included)
times the steps still to run; a resumed run counts from where it resumed.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RunProgress", "format_duration"]


def format_duration(seconds: float) -> str:
    """``42s``, ``5m07s``, ``3h02m``, ``2d04h``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


@dataclass
class RunProgress:
    """Where a run stands: epochs and steps done, the time left, the next localization pass."""

    epochs: int
    steps_per_epoch: int
    loc_epochs: Sequence[int] = ()  # 1-based epochs after which a localization pass runs
    start_step: int = 0  # the global step this session started from (resume)
    clock: Callable[[], float] = time.perf_counter
    now: Callable[[], datetime.datetime] = datetime.datetime.now  # wall clock, for the finish time
    started: float = field(init=False)

    def __post_init__(self) -> None:
        self.started = self.clock()

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def seconds_left(self, step: int) -> float | None:
        """The estimated time to the end of the run after global ``step``; None before a step of this session."""
        done = step - self.start_step
        if done <= 0:
            return None
        return (self.clock() - self.started) / done * max(self.total_steps - step, 0)

    def next_localization(self, epoch: int) -> int | None:
        """The epoch after which the next pass runs, once ``epoch`` epochs are done; None when none is left."""
        return min((e for e in self.loc_epochs if e > epoch), default=None)

    def line(self, epoch: int, step: int, images_per_s: float | None = None) -> str:
        """The progress line after ``epoch`` epochs (1-based count of finished epochs) and ``step`` steps."""
        parts = [f"epoch {epoch}/{self.epochs} (step {step}/{self.total_steps})"]
        if images_per_s is not None:
            parts.append(f"{images_per_s:.0f} images/s")
        left = self.seconds_left(step)
        if epoch >= self.epochs:
            parts.append("done")
        elif left is not None:
            finish = self.now() + datetime.timedelta(seconds=left)
            when = finish.strftime("%H:%M") if left < 86400 else finish.strftime("%Y-%m-%d %H:%M")
            parts.append(f"{format_duration(left)} left, done about {when}")
        if self.loc_epochs:
            nxt = self.next_localization(epoch)
            parts.append(f"next localization after epoch {nxt}" if nxt is not None else "no localization left")
        return " | ".join(parts)

    def logs(self, step: int) -> dict[str, float]:
        """The same for the trackers: ``progress/fraction`` and ``progress/seconds_left``."""
        numbers = {"progress/fraction": step / max(self.total_steps, 1)}
        left = self.seconds_left(step)
        if left is not None:
            numbers["progress/seconds_left"] = left
        return numbers

    def report(self, accelerator: Any, epoch: int, step: int, images_per_s: float | None = None) -> str:
        """Print the line (main process) and log the numbers to the run's trackers; returns the line."""
        text = self.line(epoch, step, images_per_s)
        accelerator.print(text)
        accelerator.log(self.logs(step), step=step)
        return text
