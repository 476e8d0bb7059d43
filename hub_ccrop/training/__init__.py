"""The training loop under accelerate: data and view sources, the loop and its schedules, localization
passes and the kNN monitor, checkpoints and resume, the final report.

    from hub_ccrop.training import train
    metrics = train(load_recipe("recipes/quickstart.yaml"), "runs/quickstart")
"""

from hub_ccrop.training.data_source import (
    LoaderViews,
    ResidentViews,
    RunData,
    SeededCollate,
    StreamViews,
    ViewSource,
    build_data,
    view_source,
)
from hub_ccrop.training.loop import Run, end_of_epoch, train, train_one_epoch
from hub_ccrop.training.report import summary
from hub_ccrop.training.state import NonFiniteLossError, NonFiniteWatch, StopRequest, TrainState

__all__ = [
    "LoaderViews",
    "NonFiniteLossError",
    "NonFiniteWatch",
    "ResidentViews",
    "Run",
    "RunData",
    "SeededCollate",
    "StopRequest",
    "StreamViews",
    "TrainState",
    "ViewSource",
    "build_data",
    "end_of_epoch",
    "summary",
    "train",
    "train_one_epoch",
    "view_source",
]
