"""Tiny OpenAI-shaped CLIP weights that load into both the official `clip.build_model` and benchsuite.

Parity scripts (``parity/*_parity.py``) run an official method implementation beside its benchsuite
plugin on the *same* weights. OpenAI's builder infers every shape from the state dict and uses
64-wide attention heads, so all widths here are multiples of 64; weights are rounded to fp16 and back
(the official builder casts to fp16 before the trainers call ``.float()``), so both sides start from
bit-identical fp32 tensors.

Nothing here is fetched code: the official repositories are obtained with the ``fetch`` tool at run
time and put on ``sys.path`` by each parity script.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

MODEL_NAME = "bs-parity-tiny"


def config(*, layers: int = 4, text_width: int = 128, vision_width: int = 128, embed_dim: int = 64,
           image_size: int = 64, patch_size: int = 16, text_layers: int | None = None) -> dict:
    """An open_clip model config whose OpenAI-builder reading is the same architecture (``text_layers``
    defaults to ``layers``; GOPro's code fixes 12 vision blocks, its text tower may be shallower)."""
    for what, w in (("text_width", text_width), ("vision_width", vision_width), ("embed_dim", embed_dim)):
        if w % 64:
            raise ValueError(f"{what}={w}: OpenAI's builder needs multiples of 64 (64-wide heads)")
    return {
        "embed_dim": embed_dim,
        "quick_gelu": True,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": vision_width, "patch_size": patch_size,
                       "head_width": 64},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": text_width, "heads": text_width // 64,
                     "layers": layers if text_layers is None else text_layers},
    }


def make_state_dict(seed: int = 0, **shape) -> dict[str, torch.Tensor]:
    """Random open_clip weights in OpenAI key layout, fp16-rounded, fp32; logit scale log(100)."""
    import open_clip

    cfg = config(**shape)
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**cfg)
    state = {k: v.detach().half().float().clone() for k, v in model.state_dict().items()}
    state["logit_scale"] = torch.tensor(float(torch.tensor(100.0).log().half().float()))
    return state


def write_checkpoint(state: dict[str, torch.Tensor], folder: Path | None = None, **shape) -> tuple[str, Path]:
    """Register the config with open_clip and save the state dict; returns (model name, checkpoint path)
    for ``benchsuite.clip.backbone.load_backbone(name, str(path))``, the loader users run."""
    import open_clip

    folder = Path(folder or tempfile.mkdtemp(prefix="bs-parity-"))
    cfg_path = folder / f"{MODEL_NAME}.json"
    cfg_path.write_text(json.dumps(config(**shape)))
    open_clip.add_model_config(cfg_path)
    ckpt = folder / "weights.pt"
    torch.save(state, ckpt)
    return MODEL_NAME, ckpt


def benchsuite_backbone(state: dict[str, torch.Tensor], **shape):
    """benchsuite's Backbone on these weights, fp32, CPU, through the real loading path."""
    from benchsuite.clip.backbone import load_backbone

    name, ckpt = write_checkpoint(state, **shape)
    return load_backbone(name, str(ckpt), precision="fp32", device="cpu")


def plugin_setup(name: str, backbone, classnames: list[str], *, dataset: str = "caltech101",
                 template: str = "a photo of a {}.", seed: int = 1, **recipe):
    """(method instance, its module, the recipe) of benchsuite method ``name`` built as a base2new job
    would build it: the harness defaults, the method's 16-shot recipe for ``dataset``, then ``recipe``."""
    from benchsuite.engine.recipe import HARNESS_DEFAULTS
    from benchsuite.hookspecs import SetupContext
    from benchsuite.methods import get_method, job_manager
    from benchsuite.protocols import load_protocol

    pm, method = job_manager(get_method(name))
    protocol = load_protocol("base2new")
    full = {**HARNESS_DEFAULTS, **pm.hook.recipe(protocol=protocol, dataset=dataset, shots=16), **recipe}
    module = method.setup(SetupContext(backbone=backbone, classnames=classnames, dataset=dataset, template=template,
                                       recipe=full, protocol=protocol, shots=16, seed=seed,
                                       device=torch.device("cpu")))
    return method, module, full


def official_model(build_model, state: dict[str, torch.Tensor]):
    """The official ``clip.model.build_model`` (pass the function) on the same weights, cast to fp32 as the
    trainers do for fp32."""
    return build_model({k: v.clone() for k, v in state.items()}).float().eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, the figure every parity script reports (tolerance 1e-5 in fp32)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def report(name: str, a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    err = relative_error(a, b)
    ok = err <= tol
    print(f"{'OK ' if ok else 'BAD'} {name:<40} rel.err {err:.2e} (tol {tol:.0e})")
    return ok
