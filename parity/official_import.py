"""Import an official CoOp-family trainer file for a parity script, without Dassl, CUDA or downloads.

The parity scripts need only a trainer's model classes (``PromptLearner``, ``CustomCLIP``), not the
Dassl trainer. This module stubs the ``dassl`` imports those files make, makes ``.cuda()`` a no-op
while official code builds its modules (this machine has no GPU), and points the official
``clip._MODELS`` / ``clip._download`` at a local state-dict file (methods.md 7.12). Nothing here is
fetched code: the official repository is a path given on the command line.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch


def _stub_dassl() -> None:
    """Minimal ``dassl`` modules with the names the trainer files import at module level."""
    if "dassl" in sys.modules:
        return

    class Registry:
        def register(self, *args, **kwargs):
            return (lambda obj: obj) if not args or not callable(args[0]) else args[0]

    def unused(*_args, **_kwargs):
        raise RuntimeError("parity scripts use the official model classes only, not the Dassl trainer")

    names = {
        "engine": {"TRAINER_REGISTRY": Registry(), "TrainerX": object},
        "metrics": {"compute_accuracy": unused},
        "utils": {"load_pretrained_weights": unused, "load_checkpoint": unused},
        "optim": {"build_optimizer": unused, "build_lr_scheduler": unused},
    }
    root = types.ModuleType("dassl")
    sys.modules["dassl"] = root
    for sub, attrs in names.items():
        module = types.ModuleType(f"dassl.{sub}")
        module.__dict__.update(attrs)
        sys.modules[f"dassl.{sub}"] = module
        setattr(root, sub, module)


def load_trainer(repo_root: Path, relative: str, name: str):
    """The official trainer module at ``repo_root/relative`` (its own ``clip`` package on sys.path)."""
    repo_root = Path(repo_root).resolve()
    path = repo_root / relative
    if not path.is_file():
        raise SystemExit(f"{path}: not found; pass --official <clone of the official repository>")
    _stub_dassl()
    sys.path.insert(0, str(repo_root))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def no_cuda():
    """``Module.cuda()`` and ``Tensor.cuda()`` return their object unchanged (official code calls them
    unconditionally)."""
    saved = torch.nn.Module.cuda, torch.Tensor.cuda
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.nn.Module.cuda, torch.Tensor.cuda = saved


def local_weights(clip_module, state: dict[str, torch.Tensor], folder: Path, backbone_name: str = "ViT-B/16") -> str:
    """Save ``state`` and make the official ``load_clip_to_cpu(cfg)`` read it (its ``torch.jit.load``
    fails on a state dict and it falls back to ``torch.load``, its own path for non-JIT files)."""
    path = Path(folder) / "official_state.pt"
    torch.save(state, path)
    clip_module._MODELS[backbone_name] = str(path)
    clip_module._download = lambda url, root=None: url
    return str(path)


def cfg(**sections) -> SimpleNamespace:
    """A yacs-like config: ``cfg(TRAINER={"COOP": {...}}, INPUT={"SIZE": (64, 64)})``."""
    def wrap(value):
        return SimpleNamespace(**{k: wrap(v) for k, v in value.items()}) if isinstance(value, dict) else value
    return wrap(sections)
