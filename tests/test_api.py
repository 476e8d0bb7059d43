"""The Python API (hub_ccrop.train / load_recipe / load_backbone / load_boxes) and the trackers of train.log_with."""

from __future__ import annotations

import ast
import importlib.util
import time
from pathlib import Path

import pytest
import torch
import yaml

import hub_ccrop
from hub_ccrop.recipe import RecipeError
from hub_ccrop.synthetic import small_objects_dir

ROOT = Path(__file__).resolve().parents[1]
ROWS = 64


@pytest.fixture(scope="module")
def objects(tmp_path_factory) -> Path:
    return small_objects_dir(tmp_path_factory.mktemp("objects"), train=ROWS, test=16)


def recipe_dict(data_dir: Path) -> dict:
    """One epoch of two 32-image steps, R-Crop (no pass), no kNN monitor: a run folder in a few seconds."""
    return {
        "name": "api",
        "model": {"name": "resnet_tiny_cifar"},
        "method": {"name": "simclr"},
        "data": {"dataset": "small_objects", "data_dir": str(data_dir), "batch_size": 32, "num_workers": 0,
                 "image_size": 32},
        "crop": {"mode": "rcrop"},
        "optim": {"lr": 0.1},
        "train": {"epochs": 3, "knn_every": 0, "log_every": 1, "show_images": 0},
    }


def module_level_imports(module: str) -> set[str]:
    """Every module that importing ``module`` runs (its module-level imports, followed through hub_ccrop's own
    files; imports inside functions run later, on use). Third-party packages appear by top-level name."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # a submodule runs its packages' __init__ first
            todo_name = ".".join(parts[:i])
            if todo_name in seen:
                continue
            seen.add(todo_name)
            path = ROOT.joinpath(*parts[:i])
            file = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
            if parts[0] != "hub_ccrop" or not file.is_file():
                continue
            for node in ast.parse(file.read_text()).body:  # module level only: not inside def/class
                if isinstance(node, ast.Import):
                    todo += [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    todo.append(node.module)
                    todo += [f"{node.module}.{a.name}" for a in node.names
                             if ROOT.joinpath(*node.module.split("."), a.name).with_suffix(".py").is_file()
                             or ROOT.joinpath(*node.module.split("."), a.name).is_dir()]
    return seen


def test_import_is_light_and_the_api_names_load_on_first_use():
    imported = module_level_imports("hub_ccrop")
    assert "hub_ccrop.boxes" in imported and "torch" in imported  # the walk follows the package
    heavy = {"hub_ccrop.training", "hub_ccrop.evaluate", "hub_ccrop.hub", "hub_ccrop.api", "datasets", "matplotlib"}
    assert not heavy & imported, heavy & imported
    assert hub_ccrop.load_recipe.__module__ == "hub_ccrop.recipe"
    assert hub_ccrop.load_boxes.__module__.startswith("hub_ccrop.hub")
    assert hub_ccrop.train.__module__ == "hub_ccrop.api" and "train" in hub_ccrop.__all__


@pytest.fixture(scope="module")
def api_run(objects, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("api") / "run"
    assert hub_ccrop.train(recipe_dict(objects), overrides={"train.epochs": 1, "train.seed": 3}, output_dir=out) == out
    return out


def test_train_returns_the_run_folder_that_the_loaders_read(api_run, objects, tmp_path):
    out = api_run
    assert (out / "backbone.safetensors").is_file()
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["seed"] == 3  # the override was applied
    backbone = hub_ccrop.load_backbone(out).eval()
    with torch.no_grad():
        assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, hub_ccrop.feature_dim(backbone))
    assert len(hub_ccrop.load_boxes(out, dataset_num_rows=ROWS)) == ROWS
    recipe = hub_ccrop.load_recipe(out / "recipe.yaml", ["train.epochs=2"])
    assert recipe.train.epochs == 2 and recipe.run_dir() == Path("runs/api")
    # the run's config went to TensorBoard (the default tracker), its steps as scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (hparams,) = (out / "logs").rglob("hparams.yml")
    config = yaml.safe_load(hparams.read_text())
    assert config["train.log_with"] == "tensorboard" and config["train.seed"] == 3 and config["optim.lr"] == 0.1
    scalars = {tag for events in (out / "logs").rglob("events.out.tfevents.*")
               for tag in EventAccumulator(str(events)).Reload().Tags()["scalars"]}
    assert "train/loss" in scalars and "train/lr" in scalars
    with pytest.raises(RecipeError, match="train.epochs"):
        hub_ccrop.train(recipe_dict(objects), overrides=["train.epochs=zero"], output_dir=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_log_with_is_checked_before_anything_runs(objects):
    raw = recipe_dict(objects)
    assert hub_ccrop.load_recipe(raw, ["train.log_with=none"]).trackers() == []
    assert hub_ccrop.load_recipe(raw, ["train.log_with=[tensorboard]"]).trackers() == ["tensorboard"]
    with pytest.raises(RecipeError, match=r"unknown tracker 'tensorbaord' \(did you mean tensorboard"):
        hub_ccrop.load_recipe(raw, ["train.log_with=tensorbaord"])
    missing = next((t for t in ("aim", "clearml", "comet_ml", "swanlab") if importlib.util.find_spec(t) is None), None)
    if missing is not None:
        with pytest.raises(RecipeError, match=f"{missing} is not installed: pip install"):
            hub_ccrop.load_recipe(raw, [f"train.log_with=[tensorboard, {missing}]"])


# A second tracker, offline: wandb (offline mode) or MLflow (a local file store), whichever is installed.
SECOND_TRACKERS = {
    "wandb": lambda tmp: {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp), "WANDB_SILENT": "true",
                          "WANDB_DISABLE_GIT": "true"},
    "mlflow": lambda tmp: {"MLFLOW_TRACKING_URI": (tmp / "mlruns").as_uri()},
}


def _second_tracker() -> str | None:
    return next((name for name in SECOND_TRACKERS if importlib.util.find_spec(name) is not None), None)


@pytest.mark.skipif(_second_tracker() is None, reason="neither wandb nor mlflow is installed")
def test_a_second_tracker_offline_gets_the_config_and_the_steps(objects, tmp_path, monkeypatch):
    name = _second_tracker()
    for key, value in SECOND_TRACKERS[name](tmp_path).items():
        monkeypatch.setenv(key, value)
    out = hub_ccrop.train(recipe_dict(objects), overrides={"train.epochs": 1, "train.log_with": ["tensorboard", name]},
                          output_dir=tmp_path / "run")
    assert next((out / "logs").rglob("hparams.yml"))  # TensorBoard still logs alongside
    if name == "wandb":
        (records,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")  # what `wandb sync` would upload
        for _ in range(60):  # wandb's own service process may still be writing the records
            data = records.read_bytes()
            if b"train/loss" in data:
                break
            time.sleep(0.5)
        assert b"optim.lr" in data and b"train/loss" in data
    else:
        import mlflow

        (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
        assert run.data.params["optim.lr"] == "0.1" and "train/loss" in run.data.metrics


def test_the_readme_example_runs_as_written(api_run, monkeypatch):
    """The README's Python API block, with the training call answered by a finished run (same signature)."""
    import inspect
    import re

    import hub_ccrop.api

    (block,) = re.findall(r"## Python API\n.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert len(block.strip().splitlines()) <= 6  # import + five lines
    calls = []

    def trained(*args, **kwargs):
        inspect.signature(hub_ccrop.api.train).bind(*args, **kwargs)
        recipe = hub_ccrop.load_recipe(ROOT / args[0], hub_ccrop.api.override_strings(kwargs.get("overrides")))
        calls.append(recipe)
        return api_run

    monkeypatch.setattr(hub_ccrop.api, "train", trained)
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert calls[0].train.seed == 1 and scope["run"] == api_run
    assert len(scope["boxes"]) == ROWS and scope["recipe"].train.epochs == 16
    assert callable(scope["backbone"])
