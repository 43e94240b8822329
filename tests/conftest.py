"""Shared fixtures: a tiny open_clip architecture, its checkpoint, and fixture datasets in the real layouts."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch

from fixture_data import make_data_root

TINY_MODEL = "bs-tiny-test"
open_clip.add_model_config(Path(__file__).parent / "model_configs" / f"{TINY_MODEL}.json")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A state-dict checkpoint of the tiny model with fixed random weights (a 'local checkpoint file')."""
    torch.manual_seed(1234)
    model = open_clip.create_model(TINY_MODEL, pretrained=None)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_backbone(tiny_checkpoint):
    from benchsuite.clip.backbone import load_backbone

    return load_backbone(TINY_MODEL, str(tiny_checkpoint), precision="fp32", device="cpu")


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """All 15 datasets in their real layouts, tiny images; shared read-only by the tests."""
    return make_data_root(tmp_path_factory.mktemp("data"))


@pytest.fixture
def with_methods(monkeypatch):
    """Make discovery list test-local method classes beside the installed ones (as a third-party
    distribution "tests-dist" 0.0 would provide them)."""
    import benchsuite.methods as methods_module
    from benchsuite.methods import MethodEntry, discover

    def install(*classes):
        found = {**discover(), **{cls.name: MethodEntry(cls.name, cls, "tests-dist", "0.0", cls.name)
                                  for cls in classes}}
        monkeypatch.setattr(methods_module, "discover", lambda: found)
    return install
