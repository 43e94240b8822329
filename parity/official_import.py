"""Import an official CoOp-family trainer file for a parity script, without Dassl, CUDA or downloads.

The parity scripts need only a trainer's model classes (``PromptLearner``, ``CustomCLIP``) and at most
its ``forward_backward``, not the Dassl trainer. This module stubs the ``dassl`` imports those files
make, makes ``.cuda()`` (and optionally ``.half()``) a no-op while official code runs (this machine has
no GPU), and points the official ``clip._MODELS`` / ``clip._download`` at a local state-dict file
(methods.md 7.12). Nothing here is fetched code: the official repository is a path given on the
command line.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch


def unused(*_args, **_kwargs):
    """Stands in for Dassl/library functions the parity scripts never reach."""
    raise RuntimeError("parity scripts use the official model classes only, not the Dassl trainer")


def stub_module(name: str, **attrs) -> types.ModuleType:
    """``sys.modules[name]`` if already imported, else an empty module holding ``attrs`` (also set as an
    attribute of its parent when the parent is loaded)."""
    if name in sys.modules:
        return sys.modules[name]
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
        setattr(sys.modules[parent], child, module)
    return module


class _Registry:
    def register(self, *args, **kwargs):
        return (lambda obj: obj) if not args or not callable(args[0]) else args[0]


def stub_dassl(extra: dict[str, dict[str, object]] | None = None) -> None:
    """Minimal ``dassl`` modules with the names the trainer files import at module level; ``extra`` adds
    names per submodule, e.g. ``{"utils": {"MetricMeter": object}}``."""
    if "dassl" in sys.modules:
        return
    names = {
        "engine": {"TRAINER_REGISTRY": _Registry(), "TrainerX": object},
        "metrics": {"compute_accuracy": unused},
        "utils": {"load_pretrained_weights": unused, "load_checkpoint": unused},
        "optim": {"build_optimizer": unused, "build_lr_scheduler": unused},
    }
    for sub, attrs in (extra or {}).items():
        names.setdefault(sub, {}).update(attrs)
    stub_module("dassl")
    for sub, attrs in names.items():
        stub_module(f"dassl.{sub}", **attrs)


def load_trainer(repo_root: Path, relative: str, name: str | None = None,
                 extra_dassl: dict[str, dict[str, object]] | None = None) -> types.ModuleType:
    """The official trainer module at ``repo_root/relative`` (``repo_root`` first on sys.path, for its
    own ``clip`` package), registered as ``name`` (default: its dotted path, e.g. ``trainers.maple``)."""
    repo_root = Path(repo_root).resolve()
    path = repo_root / relative
    if not path.is_file():
        raise SystemExit(f"{path}: not found; pass --official <clone of the official repository>")
    stub_dassl(extra_dassl)
    if str(repo_root) not in sys.path:
        sys.path.insert(0, str(repo_root))
    name = name or relative.removesuffix(".py").replace("/", ".")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def official_runtime(half_is_identity: bool = False) -> Iterator[None]:
    """``Module.cuda()`` and ``Tensor.cuda()`` return their object unchanged (official code calls them
    unconditionally); with ``half_is_identity`` so do ``Tensor.half()`` and ``Module.half()``, so that an
    official fp32 path that rounds prompts to fp16 runs in fp32 throughout."""
    saved = torch.nn.Module.cuda, torch.Tensor.cuda, torch.Tensor.half, torch.nn.Module.half
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.cuda = lambda self, *a, **k: self
    if half_is_identity:
        torch.Tensor.half = lambda self, *a, **k: self
        torch.nn.Module.half = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.nn.Module.cuda, torch.Tensor.cuda, torch.Tensor.half, torch.nn.Module.half = saved


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


def bare_trainer(trainer_cls: type, model: torch.nn.Module, config: SimpleNamespace, lr: float):
    """An official trainer object without Dassl's ``__init__``: its own ``forward_backward`` runs one batch
    as one epoch at constant ``lr`` (SGD, momentum 0.9, weight decay 5e-4) on ``model``'s learnables."""
    trainer = object.__new__(trainer_cls)
    trainer.model, trainer.cfg, trainer.scaler, trainer.device = model, config, None, torch.device("cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    trainer.optim = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4, dampening=0, nesterov=False)
    trainer.batch_idx, trainer.num_batches, trainer.update_lr = 0, 1, lambda: None
    return trainer


def recording_functional(seen: dict) -> tuple[types.SimpleNamespace, object]:
    """A stand-in for an official module's ``F`` (``torch.nn.functional``) whose ``cross_entropy``
    appends (logits, loss) to ``seen["ce"]``, and a ``cls_acc`` that appends its logits to
    ``seen["acc"]``: how parity scripts observe an official training loop they run unchanged."""
    def cross_entropy(logits, target, *args, **kwargs):
        loss = torch.nn.functional.cross_entropy(logits, target, *args, **kwargs)
        seen["ce"].append((logits.detach().clone(), loss.detach().clone()))
        return loss

    def cls_acc(output, target, topk=1):
        seen["acc"].append(output.detach().clone())
        return 0.0

    functional = types.SimpleNamespace(**{n: getattr(torch.nn.functional, n) for n in dir(torch.nn.functional)
                                          if not n.startswith("__")})
    functional.cross_entropy = cross_entropy
    return functional, cls_acc
