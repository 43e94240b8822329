"""Checkpoints never run code: strict TorchScript detection, weights-only loading of everything else."""

from __future__ import annotations

import builtins
import re
import zipfile
from pathlib import Path

import pytest
import torch

from benchsuite.clip.backbone import _is_torchscript, load_backbone
from benchsuite.errors import BackboneError

TINY_MODEL = "bs-tiny-test"


class _Trap:
    """Unpickling this creates a file: proof that a loader ran code from the checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _trap_checkpoint(path: Path, marker: Path, tiny_checkpoint: Path) -> None:
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    torch.save({**state, "payload": _Trap(marker)}, path)


def _add_entries(path: Path, names: list[str]) -> None:
    with zipfile.ZipFile(path) as zf:
        top = zf.namelist()[0].split("/", 1)[0]
    with zipfile.ZipFile(path, "a") as zf:
        for name in names:
            zf.writestr(f"{top}/{name}", "def forward(self):\n    pass\n")


def test_a_torch_save_zip_with_an_added_code_entry_is_refused_without_unpickling(tmp_path, tiny_checkpoint):
    marker, path = tmp_path / "ran", tmp_path / "ViT-B-16.pt"
    _trap_checkpoint(path, marker, tiny_checkpoint)
    _add_entries(path, ["code/__torch__/model.py"])
    with pytest.raises(BackboneError, match="malformed archive"):
        load_backbone(TINY_MODEL, str(path))
    assert not marker.exists()


def test_a_zip_with_the_full_torchscript_layout_that_jit_cannot_load_is_refused(tmp_path, tiny_checkpoint):
    marker, path = tmp_path / "ran", tmp_path / "ViT-B-16.pt"
    _trap_checkpoint(path, marker, tiny_checkpoint)
    _add_entries(path, ["code/__torch__/model.py", "constants.pkl"])
    assert _is_torchscript(path)  # the layout alone looks right ...
    with pytest.raises(BackboneError, match="torch.jit.load refused it"):  # ... but jit must load it too
        load_backbone(TINY_MODEL, str(path))
    assert not marker.exists()


def test_a_real_torchscript_archive_missing_constants_is_malformed(tmp_path):
    path = tmp_path / "ts.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    assert _is_torchscript(path)
    stripped = tmp_path / "stripped.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(stripped, "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith("constants.pkl"):
                dst.writestr(info, src.read(info))
    with pytest.raises(BackboneError, match="malformed archive"):
        _is_torchscript(stripped)


def test_a_pickle_checkpoint_with_objects_is_refused_clearly(tmp_path, tiny_checkpoint):
    marker, path = tmp_path / "ran", tmp_path / "weights.pt"
    _trap_checkpoint(path, marker, tiny_checkpoint)
    with pytest.raises(BackboneError, match="holds more than tensors"):
        load_backbone(TINY_MODEL, str(path))
    assert not marker.exists()


def test_every_checkpoint_load_is_weights_only(tiny_checkpoint, monkeypatch):
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_backbone(TINY_MODEL, str(tiny_checkpoint))
    assert calls and all(flag is True for flag in calls)


def test_pyproject_requires_a_torch_that_loads_weights_only_by_default():
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    found = re.search(r'"torch>=(\d+)\.(\d+)', text)
    assert found and (int(found.group(1)), int(found.group(2))) >= (2, 6)
