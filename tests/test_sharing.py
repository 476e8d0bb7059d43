"""hub_ccrop.hub.sharing: the licence an export gets, and when a picture of training images goes out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hub_ccrop.data import DatasetSpec, get_spec, list_specs
from hub_ccrop.errors import UserError
from hub_ccrop.hub import export_run
from hub_ccrop.hub.export import PICTURE_NAME
from hub_ccrop.hub.sharing import REGISTERED_TERMS, data_terms, license_terms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import _validate_card  # noqa: E402
from test_hub import make_run, online_in_process  # noqa: E402, F401  (the loopback Hub fixture)


def set_dataset(run_dir: Path, spec: DatasetSpec) -> None:
    """Make the fake run's data ``spec`` (run.json version 2: the whole spec)."""
    run = json.loads((run_dir / "run.json").read_text())
    run["version"] = 2
    run["dataset"] = spec.to_dict() | {"num_rows": 48, "fingerprint": "fp-0123456789abcdef"}
    (run_dir / "run.json").write_text(json.dumps(run))


def card_of(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


def test_every_registered_dataset_carries_its_terms(tmp_path):
    for name in list_specs():  # a newly registered dataset needs its terms here
        assert data_terms(get_spec(name), lookup=False) is REGISTERED_TERMS[name], name
    imagenet = data_terms(get_spec("imagenet1k"))
    assert imagenet.license == "other" and imagenet.license_name == "imagenet-terms-of-access"
    assert "non-commercial research" in imagenet.note and imagenet.public
    assert data_terms(get_spec("tiny_imagenet")).license_name == "imagenet-terms-of-access"
    assert data_terms(get_spec("small_objects")).license == "apache-2.0"
    # a local copy of CIFAR-10 is CIFAR-10; a spec of that name with another source is not
    assert data_terms(get_spec("cifar10", data_dir=str(tmp_path))).license == "unknown"
    other = data_terms(get_spec("cifar10", hub_id="someone/private-cifar"), lookup=False)
    assert other.license == "other" and other.ask and not other.public
    own = data_terms(get_spec(str(tmp_path)))
    assert own.license == "other" and own.ask and not own.public and "--license ID" in own.note


def test_a_chosen_licence_replaces_the_default_and_bad_ids_are_refused(tmp_path):
    own = data_terms(get_spec(str(tmp_path)))
    mit = license_terms(own, "mit")
    assert mit.license == "mit" and mit.chosen and not mit.ask and mit.note == "chosen by the publisher (`--license mit`)"
    imagenet = license_terms(data_terms(get_spec("imagenet1k")), "cc-by-nc-4.0")
    assert imagenet.license_name is None and "ImageNet" in imagenet.note  # the data's terms stay on the card
    assert license_terms(own, None) is own
    with pytest.raises(UserError, match="Hub licence id"):
        license_terms(own, "Apache 2")


def test_own_images_ask_for_a_licence_and_stay_private_unless_asked(tmp_path, caplog, capsys):
    from hub_ccrop.commands import main

    run_dir, _ = make_run(tmp_path / "run")
    set_dataset(run_dir, DatasetSpec(name="holiday_photos", data_dir=str(tmp_path / "holiday_photos")))
    caplog.set_level("WARNING")
    out = export_run(run_dir, tmp_path / "out")
    card = card_of(out)
    assert not (out / PICTURE_NAME).exists() and PICTURE_NAME not in card.text
    assert card.data.license == "other" and "choose one with `hub-ccrop export --license ID`" in card.text
    assert "No picture of training images is published" in card.text
    assert str(tmp_path) not in card.text  # no local path on a card
    assert "--license" in caplog.text  # also said when exporting
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["license"] == "other"

    chosen = export_run(run_dir, tmp_path / "chosen", license="cc-by-nc-4.0", with_pictures=True)
    card = card_of(chosen)
    assert (chosen / PICTURE_NAME).is_file() and card.data.license == "cc-by-nc-4.0"
    assert "training images of `holiday_photos`" in card.text and "(`--with-pictures`)" in card.text
    assert "`cc-by-nc-4.0`: chosen by the publisher" in card.text and "choose one" not in card.text
    assert json.loads((chosen / "config.json").read_text())["pretrained_cfg"]["license"] == "cc-by-nc-4.0"
    assert _validate_card(str(card), "model") == []

    assert main(["export", str(run_dir), "--out", str(tmp_path / "cli"), "--license", "mit"]) == 0
    assert "(licence mit, no picture of training images)" in capsys.readouterr().out


def test_imagenet_card_names_its_terms_and_shows_its_public_images(tmp_path):
    run_dir, _ = make_run(tmp_path / "run")
    set_dataset(run_dir, get_spec("imagenet1k"))
    card = card_of(export_run(run_dir, tmp_path / "out"))
    assert card.data.license == "other" and card.data.license_name == "imagenet-terms-of-access"
    assert card.data.license_link == "https://image-net.org/download.php"
    assert "[imagenet-terms-of-access](https://image-net.org/download.php)" in card.text
    assert "non-commercial research and educational use only" in card.text
    assert "`ILSVRC/imagenet-1k` is a public dataset" in card.text and PICTURE_NAME in card.text
    assert _validate_card(str(card), "model") == []


def test_hub_datasets_get_the_licence_and_visibility_of_their_card(online_in_process):  # noqa: F811
    hub = online_in_process
    hub.add_files("someone/photos", {"README.md": b"---\nlicense: cc-by-4.0\n---\n# photos\n"})
    hub.add_files("someone/secret", {"README.md": b"---\nlicense: mit\n---\n# secret\n"})
    hub.repo("someone/secret", "dataset").private = True
    public = data_terms(DatasetSpec(name="someone/photos", hub_id="someone/photos"))
    assert public.license == "cc-by-4.0" and public.public and not public.ask
    secret = data_terms(DatasetSpec(name="someone/secret", hub_id="someone/secret"))
    assert secret.license == "other" and not secret.public and secret.ask  # asked without a token: not found
    assert not any(r.had_authorization for r in hub.requests)  # the lookups sent no token
