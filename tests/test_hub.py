"""hub_ccrop.hub: export a run as a timm Hub repo, publish it, load weights and box tables back (all offline).

Hub traffic goes to tests/hub_server.py (a Hub-compatible server on 127.0.0.1) or to a hand-seeded HF cache
with HF_HUB_OFFLINE=1. huggingface_hub reads HF_ENDPOINT/HF_HUB_OFFLINE/HF_HUB_CACHE when it is imported,
so the end-to-end checks run in subprocesses with a clean environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from hub_ccrop.boxes import BoxTable, BoxTableMismatch
from hub_ccrop.hub import (
    EXPORT_FILES,
    PAPER_LINEAR_TOP1,
    PublishError,
    export_run,
    load_boxes,
    paper_reference,
    publish_run,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import FakeHub, _validate_card  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_testtoken123"
NUM_ROWS = 48
FINGERPRINT = "fp-0123456789abcdef"


def make_run(
    root: Path,
    *,
    model_name: str = "resnet10t",
    image_size: int = 32,
    method: str = "simclr",
    metrics: dict | None = None,
    recipe_extra: str = "",
    num_rows: int = NUM_ROWS,
) -> tuple[Path, torch.nn.Module]:
    """A fake run folder (the layout train.py writes) and its trained backbone."""
    if model_name.endswith("_cifar"):
        import hub_ccrop.models  # noqa: F401
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=0)
    with torch.no_grad():  # non-default weights and BN statistics, so a silent re-init would be caught
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.1)
    model.eval()
    root.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(root / "backbone.safetensors"))
    run = {
        "model": model_name,
        "model_args": {},
        "input_size": [3, image_size, image_size],
        "mean": [0.4914, 0.4822, 0.4465],
        "std": [0.2023, 0.1994, 0.2010],
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "method": method,
        "dataset": {"name": "cifar10", "hub_id": "uoft-cs/cifar10", "splits": ["train"], "num_rows": NUM_ROWS,
                    "image_column": "img", "label_column": "label"},
        "epochs": 500,
        "schedule": {"warmup_epochs": 100, "loc_epochs": [100, 200, 300, 400], "k": 0.1, "alpha": 0.1},
        "license": "apache-2.0",
    }
    (root / "run.json").write_text(json.dumps(run, indent=2))
    table = BoxTable(num_rows, {"dataset": "uoft-cs/cifar10", "split": "train", "fingerprint": FINGERPRINT,
                                "k": 0.1, "epoch": 400, "backbone": model_name})
    g = torch.Generator().manual_seed(1)
    lo = torch.rand(num_rows, 2, generator=g) * 0.5
    table.update(torch.arange(num_rows), torch.cat([lo, lo + 0.5], dim=1))
    table.save(root / "boxes.parquet")
    table.save(root / "boxes.safetensors")
    if metrics is None:  # what train.py writes (percentages), plus a linear probe result
        metrics = {"knn_top1": 85.123, "knn_top5": 99.1, "box_iou": 0.41, "train_images_per_s": 1234.56789,
                   "linear_top1": 88.07, "history": [{"epoch": 1, "loss": 5.1, "knn_top1": 20.0}]}
    (root / "metrics.json").write_text(json.dumps(metrics))
    (root / "recipe.yaml").write_text(f"method: {method}\nmodel: {model_name}\nepochs: 500\n{recipe_extra}")
    (root / "pictures").mkdir(exist_ok=True)
    Image.new("RGB", (64, 32), (200, 30, 30)).save(root / "pictures" / "localization_epoch_0400.png")
    return root, model


@pytest.fixture(scope="module")
def run_and_export(tmp_path_factory):
    base = tmp_path_factory.mktemp("hub")
    run_dir, model = make_run(base / "run")
    out = export_run(run_dir, base / "export", repo_id="test-user/resnet10t-simclr-ccrop")
    return run_dir, out, model


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", **extra)
    return env


def run_py(code: str, env: dict[str, str], *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def assert_no_token(*paths: Path, text: str = "") -> None:
    assert TOKEN not in text
    for root in paths:
        for p in [root] if root.is_file() else root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                assert TOKEN.encode() not in p.read_bytes(), f"token written to {p}"


# -- paper data ---------------------------------------------------------------------------------------------


def test_paper_reference_table():
    assert len(PAPER_LINEAR_TOP1) == 20
    assert paper_reference("SimCLR", "uoft-cs/cifar10") == (89.63, 90.08)
    assert paper_reference("moco_v2", "CIFAR-100") == (56.10, 57.65)  # Table 1 has one MoCo row
    assert paper_reference("mocov2", "ILSVRC/imagenet-1k") == (64.40, 64.89)
    assert paper_reference("byol", "zh-plus/tiny-imagenet") == (46.08, 47.23)
    assert paper_reference("byol", "imagenet-1k") is None
    assert all(r < c for r, c in PAPER_LINEAR_TOP1.values())


# -- export and timm loading --------------------------------------------------------------------------------


def test_export_is_a_timm_repo_with_bit_identical_features(run_and_export):
    run_dir, out, trained = run_and_export
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPORT_FILES)
    config = json.loads((out / "config.json").read_text())
    cfg = config["pretrained_cfg"]
    assert config["architecture"] == "resnet10t" and config["num_classes"] == 0
    assert config["model_args"]["num_classes"] == 0
    # clean: nothing inherited from timm's ImageNet tag of resnet10t (c3_in1k, 176 px, ImageNet mean/std)
    for key in ("url", "hf_hub_id", "tag", "origin_url", "notes", "test_input_size", "test_crop_pct", "file"):
        assert key not in cfg, key
    assert cfg["input_size"] == [3, 32, 32] and cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bilinear"
    assert cfg["mean"] == [0.4914, 0.4822, 0.4465] and cfg["std"] == [0.2023, 0.1994, 0.2010]
    assert cfg["license"] == "unknown"  # CIFAR-10's own (it states none), not a licence nobody chose

    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))
        assert torch.equal(loaded.forward_features(x), trained.forward_features(x))
    assert timm.data.resolve_data_config({}, model=loaded)["input_size"] == (3, 32, 32)

    head = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=10)
    assert head.get_classifier().out_features == 10
    sd, ref = head.state_dict(), trained.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ref.items())

    feats = timm.create_model(f"local-dir:{out}", pretrained=True, features_only=True).eval()
    with torch.no_grad():
        maps = feats(x)
    assert len(maps) == 5 and maps[-1].shape[1] == 512


def test_export_refuses_non_export_folder_and_replaces_old_export(tmp_path, run_and_export):
    run_dir, out, _ = run_and_export
    with pytest.raises(FileExistsError, match="not empty"):
        export_run(run_dir, out)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        export_run(run_dir, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    again = export_run(run_dir, tmp_path / "again")
    export_run(run_dir, again, overwrite=True)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert not list(tmp_path.glob(".*tmp*"))


def test_export_cifar_stem_model(tmp_path):
    pytest.importorskip("hub_ccrop.models")
    run_dir, trained = make_run(tmp_path / "run", model_name="resnet_tiny_cifar", method="byol")
    out = export_run(run_dir, tmp_path / "export", repo_id="test-user/tiny")
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))
    readme = (out / "README.md").read_text()
    assert "import hub_ccrop" in readme and "before** `timm.create_model`" in readme
    assert "92.54" in readme  # BYOL C-Crop on CIFAR-10


# -- model card ---------------------------------------------------------------------------------------------


def test_model_card_parses_back_and_validates(run_and_export):
    from huggingface_hub import ModelCard, ModelCardData

    _, out, _ = run_and_export
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.library_name == "timm" and data.pipeline_tag == "image-feature-extraction"
    assert data.license == "unknown" and data.datasets == ["uoft-cs/cifar10"]
    assert {"timm", "contrastive-crop", "simclr", "arxiv:2202.03278"} <= set(data.tags)
    results = {r.metric_name: r for r in data.eval_results}
    knn = next(r for name, r in results.items() if name.startswith("kNN"))
    linear = next(r for name, r in results.items() if name.startswith("Linear"))
    assert knn.metric_value == 85.12 and linear.metric_value == 88.07
    assert linear.dataset_type == "uoft-cs/cifar10" and linear.task_type == "image-classification"
    ModelCardData(**data.to_dict())  # the metadata round-trips through huggingface_hub's own validation
    assert _validate_card(str(card), "model") == []  # the loopback Hub's model-index checks
    text = card.text
    assert "history" not in text and "`train_images_per_s`: 1234.5679" in text
    assert "history" in json.loads((out / "metrics.json").read_text())  # the export keeps all metrics
    for needle in ("89.63", "90.08", "88.07", "@inproceedings{peng2022crafting", "features_only=True",
                   "num_classes=10", 'hf-hub:test-user/resnet10t-simclr-ccrop"', "alpha = 0.1",
                   "after epochs 100, 200, 300, 400", "boxes_and_crops.png", "no `import hub_ccrop`"):
        assert needle in text, needle


def test_card_for_rcrop_run_without_metrics(tmp_path):
    from huggingface_hub import ModelCard

    run_dir, _ = make_run(tmp_path / "run", method="moco_v2", metrics={})
    run = json.loads((run_dir / "run.json").read_text())
    run["schedule"] = {"warmup_epochs": 500, "loc_epochs": [], "k": 0.1, "alpha": 1.0}
    (run_dir / "run.json").write_text(json.dumps(run))
    card = ModelCard.load(export_run(run_dir, tmp_path / "out") / "README.md")
    assert card.data.eval_results is None and "model-index" not in card.content
    assert "RandomResizedCrop (R-Crop)" in card.text and "86.73" in card.text  # MoCo row of Table 1
    assert 'hf-hub:ORG/NAME"' in card.text  # no repo id given
    assert card.text.lstrip().startswith("# resnet10t-mocov2-rcrop-cifar10")


def test_card_reports_the_boxes_beside_their_baselines(tmp_path):
    """A run's box metrics go on the card as the training summary's line: IoU beside the whole-image and
    centred baselines and the follow score; they are not listed again among the other metrics."""
    from huggingface_hub import ModelCard

    from hub_ccrop.box_quality import box_quality, quality_line

    gt = torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.1, 0.1, 0.9, 0.9]])
    boxes = torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.1, 0.1, 0.5, 0.9]])
    box_metrics = box_quality(boxes, gt, follow=0.7).metrics()
    run_dir, _ = make_run(tmp_path / "run", metrics={"knn_top1": 70.0, "wall_seconds": 12.5, **box_metrics})
    text = ModelCard.load(export_run(run_dir, tmp_path / "out") / "README.md").text
    assert f"Boxes of the last localization pass: {quality_line(box_metrics)}." in text
    assert "centred box of the same size 0.250" in text and "boxes follow the content 0.70" in text
    assert "So the boxes know where the objects are: +0.500 IoU over a centred box of their size." in text
    assert "`wall_seconds`: 12.5" in text and "`box_iou_centred`" not in text


def test_card_takes_results_of_evaluate_commands(tmp_path):
    """eval_knn.json / eval_linear.json (hub-ccrop eval-knn/eval-linear RUN) give the model-index entries."""
    from huggingface_hub import ModelCard

    run_dir, _ = make_run(tmp_path / "run", metrics={"knn_top1": 70.0})
    run = json.loads((run_dir / "run.json").read_text())
    run["schedule"]["crop"] = "ccrop"  # train.py records the crop mode here
    run["dataset"]["test_split"] = "train[-5000:]"
    (run_dir / "run.json").write_text(json.dumps(run))
    (run_dir / "eval_knn.json").write_text(json.dumps(
        {"protocol": "knn (cosine, weighted exp(sim/T) voting)", "top1": 81.5, "k": 200, "temperature": 0.1,
         "test_split": "test"}))
    (run_dir / "eval_linear.json").write_text(json.dumps(
        {"protocol": "linear-probe-cached-features (fast check, not the paper's protocol)", "top1": 84.25,
         "test_split": "test"}))
    out = export_run(run_dir, tmp_path / "out")
    card = ModelCard.load(out / "README.md")
    results = {r.metric_name: r for r in card.data.eval_results}
    # One named source for the headline kNN: the training summary's number, when the run had the monitor
    assert results["kNN top-1"].metric_value == 70.0 and "(`metrics.json`, the number `hub-ccrop train`" in card.text
    assert "`hub-ccrop eval knn` after training (`eval_knn.json`) measured 81.5 top-1 on `test`" in card.text
    (run_dir / "metrics.json").write_text(json.dumps({"epochs": 500}))  # a run without the kNN monitor
    card = ModelCard.load(export_run(run_dir, tmp_path / "out2") / "README.md")
    results = {r.metric_name: r for r in card.data.eval_results}
    assert results["kNN top-1 (k=200, T=0.1)"].metric_value == 81.5
    assert "Source of the kNN number: `hub-ccrop eval knn` after training (`eval_knn.json`)" in card.text
    linear = results["Linear probe top-1 (linear-probe-cached-features, not the paper's protocol)"]
    assert linear.metric_value == 84.25 and linear.dataset_split == "test"
    assert "not comparable to the paper's" in card.text
    assert json.loads((out / "metrics.json").read_text())["eval_linear"]["top1"] == 84.25


# -- box tables ---------------------------------------------------------------------------------------------


def test_box_tables_round_trip_and_mismatch_is_refused(run_and_export, tmp_path):
    run_dir, out, _ = run_and_export
    original = BoxTable.load(run_dir / "boxes.parquet")
    for source in (out, f"local-dir:{out}", out / "boxes.parquet", out / "boxes.safetensors", run_dir):
        table = load_boxes(source, dataset_num_rows=NUM_ROWS, fingerprint=FINGERPRINT)
        assert torch.equal(table.boxes, original.boxes)
        assert table.metadata["fingerprint"] == FINGERPRINT and table.metadata["backbone"] == "resnet10t"
    with pytest.raises(BoxTableMismatch, match=r"has 48 rows but the dataset has 50000"):
        load_boxes(out, dataset_num_rows=50000)
    with pytest.raises(BoxTableMismatch, match="fingerprint"):
        load_boxes(out, fingerprint="another-dataset")
    with pytest.raises(BoxTableMismatch, match="id scheme"):
        load_boxes(out, id_scheme="shuffled-v9")
    bad_run, _ = make_run(tmp_path / "bad", num_rows=NUM_ROWS + 1)
    with pytest.raises(BoxTableMismatch, match="rows"):
        export_run(bad_run, tmp_path / "bad_out")
    assert not (tmp_path / "bad_out").exists()


# -- tokens -------------------------------------------------------------------------------------------------


def test_recipe_credentials_are_redacted_and_token_folders_refused(tmp_path, monkeypatch):
    run_dir, _ = make_run(tmp_path / "run", recipe_extra=f"data:\n  hf_token: {TOKEN}\n")
    out = export_run(run_dir, tmp_path / "out")
    assert "<redacted>" in (out / "recipe.yaml").read_text()
    assert_no_token(out)
    (out / "notes.txt").write_text(f"token={TOKEN}\n")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(PublishError, match="contains your Hugging Face token") as err:
        publish_run(out, "test-user/x", endpoint="http://127.0.0.1:9")  # refused before any request
    assert TOKEN not in str(err.value)


# -- Hub: seeded cache, loopback server ---------------------------------------------------------------------


def seed_hf_cache(cache: Path, repo_id: str, folder: Path, commit: str = "a" * 40) -> None:
    """Lay out ``folder`` as huggingface_hub's cache holds a downloaded repo (blobs, snapshot links, refs)."""
    import hashlib

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for f in folder.iterdir():
        blob_id = hashlib.sha256(f.read_bytes()).hexdigest()
        (repo / "blobs").mkdir(exist_ok=True)
        shutil.copyfile(f, repo / "blobs" / blob_id)
        link = repo / "snapshots" / commit / f.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / blob_id, link.parent))


LOAD_AND_COMPARE = """
    import sys, timm, torch
    from safetensors.torch import load_file
    repo_id, run_dir = sys.argv[1], sys.argv[2]
    model = timm.create_model("hf-hub:" + repo_id, pretrained=True).eval()
    assert "hub_ccrop" not in sys.modules  # a stock timm architecture needs no import hub_ccrop
    ref = timm.create_model(model.pretrained_cfg["architecture"], num_classes=0)
    ref.load_state_dict(load_file(run_dir + "/backbone.safetensors"))
    ref.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x)), "features differ"
    assert model.pretrained_cfg["source"] == "hf-hub" and model.pretrained_cfg["hf_hub_id"] == repo_id
    head = timm.create_model("hf-hub:" + repo_id, pretrained=True, num_classes=7)
    assert head.get_classifier().out_features == 7
    timm.create_model("hf-hub:" + repo_id, pretrained=True, features_only=True)
    from hub_ccrop.boxes import BoxTable
    from hub_ccrop.hub import load_boxes
    table = load_boxes(repo_id, dataset_num_rows=48)
    assert torch.equal(table.boxes, BoxTable.load(run_dir + "/boxes.parquet").boxes)
    print("LOADED OK")
"""


def test_offline_cache_loads_each_export_as_its_card_says(run_and_export, tmp_path):
    """One fresh offline process, as a user's, with both exports in a seeded HF cache: the stock timm architecture
    loads with plain timm (no ``import hub_ccrop``); the CIFAR-stem one fails in plain timm and loads after
    ``import hub_ccrop``, exactly as each card says."""
    stock_run, stock_export, _ = run_and_export
    stock_repo, tiny_repo = "test-user/resnet10t-simclr-ccrop", "test-user/tiny-cifar"
    stock_card = (stock_export / "README.md").read_text()
    assert "`pip install timm` is all it needs (no `import hub_ccrop`)" in stock_card
    assert f"python train.py --model hf-hub:{stock_repo}" in stock_card
    tiny_run, _ = make_run(tmp_path / "run", model_name="resnet_tiny_cifar")
    tiny_export = export_run(tiny_run, tmp_path / "export", repo_id=tiny_repo)
    card = (tiny_export / "README.md").read_text()
    assert "plain timm does not know it" in card and "pip install -e ." in card and "pip install hub-ccrop" not in card
    assert "python train.py" not in card and "timm's `train.py` does not import `hub_ccrop`" in card
    seed_hf_cache(tmp_path / "hub", stock_repo, stock_export)
    seed_hf_cache(tmp_path / "hub", tiny_repo, tiny_export)
    env = clean_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"), HF_HUB_CACHE=str(tmp_path / "hub"),
                    HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens there: any request would fail
    tiny_fails_in_plain_timm = f"""
    import sys, timm
    try:
        timm.create_model("hf-hub:{tiny_repo}", pretrained=True)
    except RuntimeError as error:
        assert "Unknown model (resnet_tiny_cifar)" in str(error), error
    else:
        sys.exit("plain timm loaded an architecture it does not know")
    """
    tiny_loads_after_import = f"""
    import hub_ccrop
    model = timm.create_model("hf-hub:{tiny_repo}", pretrained=True).eval()
    ref = hub_ccrop.create_backbone("resnet_tiny_cifar")
    ref.load_state_dict(load_file("{tiny_run}/backbone.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ref.eval()(x))
    print("TINY OK")
    """
    code = textwrap.dedent(tiny_fails_in_plain_timm) + textwrap.dedent(LOAD_AND_COMPARE) + textwrap.dedent(
        tiny_loads_after_import)
    proc = run_py(code, env, stock_repo, str(stock_run))
    assert "LOADED OK" in proc.stdout and "TINY OK" in proc.stdout


@pytest.fixture
def online_in_process(monkeypatch, tmp_path):
    """Let this process talk to a loopback Hub (conftest sets HF_HUB_OFFLINE=1 for the suite)."""
    from huggingface_hub import constants

    with FakeHub(token=TOKEN) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the loopback Hub has no Xet storage
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield hub


def test_publish_to_loopback_hub_then_download_and_load(tmp_path, online_in_process, caplog, capfd):
    from hub_ccrop.commands import main

    hub = online_in_process
    run_dir, _ = make_run(tmp_path / "run")
    repo_id, boxes_repo = "test-user/ccrop-resnet10t", "test-user/ccrop-resnet10t-boxes"
    caplog.set_level("DEBUG")
    assert main(["publish", str(run_dir), "--repo-id", repo_id, "--private", "--boxes-repo-id", boxes_repo]) == 0
    captured = capfd.readouterr()
    logs = captured.out + captured.err + caplog.text
    assert f"hf-hub:{repo_id}" in captured.out and "Authorization" not in logs
    assert hub.unhandled == []

    assert hub.repo(repo_id).private
    files = hub.files(repo_id)
    assert set(EXPORT_FILES) <= set(files)
    assert files["model.safetensors"] == (run_dir / "export" / "model.safetensors").read_bytes()
    assert len(files["model.safetensors"]) > hub.multipart_threshold  # went through multipart LFS
    assert {"boxes.parquet", "boxes.safetensors", "README.md"} <= set(hub.files(boxes_repo, "dataset"))
    storage = [r for r in hub.requests if r.origin == "storage"]
    assert any(r.path.endswith("/part/1") for r in storage)
    assert not any(r.had_authorization for r in storage)  # the token never left the Hub API origin

    # a user's fresh process: HF_ENDPOINT + token from the environment, empty cache
    env = clean_env(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "home"))
    download = LOAD_AND_COMPARE + """
    from pathlib import Path
    from huggingface_hub import HfApi, ModelCard, hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError
    card = ModelCard.load(repo_id)
    card.validate()
    assert card.data.library_name == "timm" and card.data.eval_results
    cfg = Path(hf_hub_download(repo_id, "config.json"))
    assert cfg.read_text().startswith("{")
    info = HfApi().model_info(repo_id)
    assert info.library_name == "timm" and info.pipeline_tag == "image-feature-extraction"
    boxes = load_boxes(repo_id + "-boxes", repo_type="dataset", dataset_num_rows=48)
    assert boxes.metadata["fingerprint"] == "fp-0123456789abcdef"
    for fetch in (lambda: HfApi().model_info(repo_id, token=False),
                  lambda: hf_hub_download(repo_id, "config.json", token=False, cache_dir=sys.argv[3])):
        try:
            fetch()
            raise AssertionError("a private repo was served without a token")
        except RepositoryNotFoundError:
            pass
    print("DOWNLOADED OK")
"""
    proc = run_py(download, env, repo_id, str(run_dir), str(tmp_path / "fresh-cache"))
    assert "LOADED OK" in proc.stdout and "DOWNLOADED OK" in proc.stdout
    assert_no_token(run_dir, tmp_path / "home", tmp_path / "fresh-cache", text=logs + proc.stdout + proc.stderr)
    assert not any(TOKEN.encode() in data for data in hub.files(repo_id).values())


def test_failed_upload_keeps_export_and_says_what_to_rerun(tmp_path, online_in_process, caplog, capsys):
    hub = online_in_process
    run_dir, _ = make_run(tmp_path / "run")
    hub.fail.add("commit")
    caplog.set_level("DEBUG")
    with pytest.raises(PublishError) as err:
        publish_run(run_dir, "test-user/fails", endpoint=hub.url)
    message = str(err.value)
    export = run_dir / "export"
    assert "upload the folder" in message and f"hub-ccrop publish {export} --repo-id test-user/fails" in message
    assert sorted(p.name for p in export.iterdir()) == sorted(EXPORT_FILES)  # the export is intact
    # re-running on the export folder uploads it as is, to a new branch
    hub.fail.clear()
    result = publish_run(export, "test-user/fails", revision="v1", endpoint=hub.url)
    assert result.export_dir == export and "/commit/" in result.commit_url
    assert set(EXPORT_FILES) <= set(hub.files("test-user/fails", revision="v1"))
    assert "model.safetensors" not in hub.files("test-user/fails", revision="main")
    captured = capsys.readouterr()
    assert_no_token(export, text=message + caplog.text + captured.out + captured.err)


def test_publish_without_token_fails_in_one_line_before_exporting(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from hub_ccrop.commands import main

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    run_dir, _ = make_run(tmp_path / "run")
    with pytest.raises(PublishError, match="hf auth login"):
        publish_run(run_dir, "test-user/x", endpoint="http://127.0.0.1:9")
    assert main(["publish", str(run_dir), "--repo-id", "test-user/x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hf auth login" in err and "HF_TOKEN" in err, err
    assert not (run_dir / "export").exists()  # nothing exported, nothing sent


def test_cli_subcommands(tmp_path, capsys):
    from hub_ccrop.commands import build_parser

    parser = build_parser()
    args = parser.parse_args(["publish", "RUN", "--repo-id", "o/n", "--private", "--revision", "v1"])
    assert args.repo_id == "o/n" and args.private and args.revision == "v1" and callable(args.func)
    run_dir, _ = make_run(tmp_path / "run")
    args = parser.parse_args(["export", str(run_dir), "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    assert "local-dir:" in capsys.readouterr().out and (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize(("localizer", "expected"), [
    ("the backbone being trained", "`vit_small_patch16_224` (the backbone being trained)"),
    ("hf-hub:org/dino-vit", "`vit_small_patch16_224` (an external localizer, `hf-hub:org/dino-vit`)"),
])
def test_card_says_how_the_boxes_were_made(localizer, expected, tmp_path):
    """The box table's metadata (heatmap source, localizer and its network, rule) reaches the card's training
    details and the picture's caption; a table without it adds nothing."""
    from huggingface_hub import ModelCard

    run_dir, _ = make_run(tmp_path / "run")
    table = BoxTable.load(run_dir / "boxes.parquet")
    table.metadata.update(heatmap_source="cls_attention", localizer=localizer, localizer_network="vit_small_patch16_224",
                          box_rule="threshold", k=0.5, heatmap_flip=True)
    table.save(run_dir / "boxes.parquet")
    text = ModelCard.load(export_run(run_dir, tmp_path / "out") / "README.md").text
    made_by = (f"heatmaps from the class token's attention to the patches in the last block (mean over heads) of "
               f"{expected}; rule `threshold` at k = 0.5, heatmaps averaged with those of the image turned by 180 degrees")
    assert f"- **Boxes:** {made_by}." in text and f"Boxes and heatmaps: {made_by}." in text
    plain = ModelCard.load(export_run(make_run(tmp_path / "plain")[0], tmp_path / "plain_out") / "README.md").text
    assert "**Boxes:**" not in plain and "Boxes and heatmaps:" not in plain


def test_card_says_the_follow_check_chose_the_heatmap(tmp_path):
    """A pass that chose between a ViT's two maps (crop.heatmap auto) records both follow scores; the card
    names the chosen map and the scores it was chosen by."""
    from huggingface_hub import ModelCard

    run_dir, _ = make_run(tmp_path / "run")
    table = BoxTable.load(run_dir / "boxes.parquet")
    table.metadata.update(heatmap_source="feature_norm", heatmap_follow={"cls_attention": -0.012, "feature_norm": 0.7712},
                          localizer="the backbone being trained", localizer_network="vit_tiny_patch16_224", k=0.5)
    table.save(run_dir / "boxes.parquet")
    text = ModelCard.load(export_run(run_dir, tmp_path / "out") / "README.md").text
    assert ("heatmaps from the last feature map (channel sum; token L2 norm for a ViT) of `vit_tiny_patch16_224` (the "
            "backbone being trained) (chosen by the follow check: its boxes follow the content 0.77, cls_attention "
            "-0.01); rule `threshold` at k = 0.5") in text


@pytest.mark.parametrize(("method", "dataset", "expected"), [
    ("moco_v2", "cifar10", PAPER_LINEAR_TOP1[("moco", "cifar10")]),
    ("moco_v1", "ILSVRC/imagenet-1k", PAPER_LINEAR_TOP1[("moco_v1", "imagenet-1k")]),
    ("moco_v3", "cifar10", None), ("mocov3", "imagenet-1k", None), ("dino", "cifar10", None),
    ("barlow_twins", "cifar10", None),
])
def test_paper_reference_only_for_the_papers_methods(method, dataset, expected):
    """The paper has MoCo v1/v2 rows, none for MoCo v3 (another method) or the newer methods."""
    assert paper_reference(method, dataset) == expected


@pytest.mark.parametrize(("method", "name"), [("moco_v3", "MoCo v3"), ("barlow_twins", "Barlow Twins"),
                                              ("dino", "DINO"), ("vicreg", "VICReg")])
def test_card_names_the_newer_methods(method, name, tmp_path):
    from huggingface_hub import ModelCard

    run_dir, _ = make_run(tmp_path / "run", method=method)
    text = ModelCard.load(export_run(run_dir, tmp_path / "out") / "README.md").text
    assert f"- **Method:** {name}, self-supervised" in text


def test_export_refuses_weights_of_another_architecture(tmp_path):
    """export builds the backbone the one way a run's backbone is built (evaluate.load_backbone, strictly):
    weights that do not fit run.json's architecture end in one line naming the file and the architecture."""
    run_dir, _ = make_run(tmp_path / "run")
    other = timm.create_model("resnet18", num_classes=0)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(run_dir / "backbone.safetensors"))
    with pytest.raises(ValueError, match=r"backbone.safetensors does not fit resnet10t with model_args=\{\}"):
        export_run(run_dir, tmp_path / "out")
