"""hub_ccrop.progress: the run-level line (epoch, images/s, time left, next localization pass)."""

from __future__ import annotations

import datetime

import pytest

from hub_ccrop.progress import RunProgress, format_duration


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_format_duration():
    assert [format_duration(s) for s in (0, 42.4, 61, 3599, 3600 * 3 + 125, 86400 * 2 + 3600 * 4)] == [
        "0s", "42s", "1m01s", "59m59s", "3h02m", "2d04h"]


def progress(clock: Clock, start_step: int = 0) -> RunProgress:
    return RunProgress(epochs=8, steps_per_epoch=32, loc_epochs=[4, 6], start_step=start_step, clock=clock,
                       now=lambda: datetime.datetime(2025, 1, 1, 12, 0))


def test_time_left_is_this_sessions_time_per_step_times_the_steps_left():
    clock = Clock()
    p = progress(clock)
    assert p.seconds_left(0) is None and "left" not in p.line(0, 0)
    clock.t += 64.0  # 2 epochs of 32 steps at 1 s per step
    assert p.seconds_left(64) == pytest.approx(192.0)
    line = p.line(2, 64, images_per_s=331.4)
    assert line == ("epoch 2/8 (step 64/256) | 331 images/s | 3m12s left, done about 12:03 | "
                    "next localization after epoch 4")
    assert p.logs(64) == {"progress/fraction": 0.25, "progress/seconds_left": pytest.approx(192.0)}
    clock.t += 6 * 64.0
    assert p.line(8, 256).endswith("done | no localization left")


def test_a_resumed_run_counts_from_where_it_resumed():
    clock = Clock()
    p = progress(clock, start_step=128)  # resumed after epoch 4
    clock.t += 32 * 2.0  # 2 s per step since the resume
    assert p.seconds_left(160) == pytest.approx(96 * 2.0)
    assert p.next_localization(5) == 6 and p.next_localization(6) is None


def test_report_prints_and_logs():
    class Accelerator:
        printed: list[str] = []
        logged: list[tuple[dict, int]] = []

        def print(self, text):
            self.printed.append(text)

        def log(self, values, step):
            self.logged.append((values, step))

    clock, acc = Clock(), Accelerator()
    p = progress(clock)
    clock.t += 10
    text = p.report(acc, 1, 32, images_per_s=100.0)
    assert acc.printed == [text] and acc.logged[0][1] == 32 and "progress/seconds_left" in acc.logged[0][0]
