"""Parity of the `maple` plugin with muzairkhattak/multimodal-prompt-learning, on tiny OpenAI-shaped weights.

Usage (the official repository is obtained separately and never committed)::

    python parity/maple_parity.py --official /work/official/multimodal-prompt-learning

Both sides get the same fp32 weights (`tiny_clip.make_state_dict`), class names, images and initial
learnable state (the official prompt learner's tensors are copied into the plugin). The official code
hard-codes text width 512 and vision width 768 (``torch.empty(n_ctx, 512)``, ``nn.Linear(ctx_dim, 768)``),
so the tiny model has those widths with 4 layers and prompt depth 3 (blocks after the prompted ones are
exercised too). Compared, each within 1e-5 relative: evaluation logits, the training loss, and every
learnable tensor's gradient and value after one SGD step (lr 0.0035, momentum 0.9, weight decay 5e-4) driven by the official
trainer's own ``forward_backward``.

What it takes to run the official code here (methods.md 7.12), in this script only: ``dassl`` is
stubbed (only the model classes and ``forward_backward`` run), ``.cuda()`` is a no-op. The official
forward rounds every vision and deep text prompt with ``.half()`` even in fp32 mode, and casts the
shallow coupling to fp16 at build time (then its fp32 path fails: fp16 weights x fp32 context); while
the official model runs, ``Tensor.half``/``Module.half`` are the identity, which makes it fp32
throughout. The last line reports, for information, how far the official logits move with the fp16
rounding of the prompts left in.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_clip import benchsuite_backbone, make_state_dict, relative_error, report  # noqa: E402

SHAPE = dict(layers=4, text_width=512, vision_width=768, embed_dim=64, image_size=64, patch_size=16)
CLASSNAMES = ["golden_retriever", "cat", "sea lion", "airplane_cabin", "1993 Geo Metro Convertible"]
DEPTH, N_CTX, LR, BATCH = 3, 2, 0.0035, 4


def stub_dassl() -> None:
    class Registry:
        def register(self, *args, **kwargs):
            return args[0] if args and callable(args[0]) else (lambda obj: obj)

    def unused(*_a, **_k):
        raise RuntimeError("the parity script runs the official model classes and forward_backward only")

    root = types.ModuleType("dassl")
    sys.modules["dassl"] = root
    for sub, attrs in {"engine": {"TRAINER_REGISTRY": Registry(), "TrainerX": object},
                       "metrics": {"compute_accuracy": unused},
                       "utils": {"load_pretrained_weights": unused, "load_checkpoint": unused},
                       "optim": {"build_optimizer": unused, "build_lr_scheduler": unused}}.items():
        module = types.ModuleType(f"dassl.{sub}")
        module.__dict__.update(attrs)
        sys.modules[f"dassl.{sub}"] = module
        setattr(root, sub, module)


@contextlib.contextmanager
def official_runtime(half_is_identity: bool = True):
    """No CUDA calls; optionally `.half()` as the identity (the official fp32 path is then fp32 throughout)."""
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


def ns(**items) -> SimpleNamespace:
    return SimpleNamespace(**{k: ns(**v) if isinstance(v, dict) else v for k, v in items.items()})


def official_trainer(repo: Path, state: dict):
    if not (repo / "trainers" / "maple.py").is_file():
        raise SystemExit(f"{repo}/trainers/maple.py: not found; pass --official <clone of "
                         f"muzairkhattak/multimodal-prompt-learning>")
    sys.path.insert(0, str(repo))
    stub_dassl()
    maple = importlib.import_module("trainers.maple")
    from clip.model import build_model

    cfg = ns(TRAINER={"MAPLE": {"N_CTX": N_CTX, "CTX_INIT": "a photo of a", "PREC": "fp32", "PROMPT_DEPTH": DEPTH}},
             INPUT={"SIZE": (SHAPE["image_size"],) * 2}, MODEL={"BACKBONE": {"NAME": "ViT-B/16"}, "INIT_WEIGHTS": ""})
    design = {"trainer": "MaPLe", "vision_depth": 0, "language_depth": 0, "vision_ctx": 0, "language_ctx": 0,
              "maple_length": N_CTX}
    with official_runtime():
        clip_model = build_model({k: v.clone() for k, v in state.items()}, design).float().eval()
        model = maple.CustomCLIP(cfg, CLASSNAMES, clip_model)
    for name, param in model.named_parameters():  # the trainer's rule
        param.requires_grad_("prompt_learner" in name or "VPT" in name)
    trainer = object.__new__(maple.MaPLe)
    trainer.model, trainer.cfg, trainer.scaler, trainer.device = model, cfg, None, torch.device("cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    trainer.optim = torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=5e-4, dampening=0, nesterov=False)
    trainer.batch_idx, trainer.num_batches, trainer.update_lr = 0, 1, lambda: None
    return trainer


def learnables(pl) -> dict[str, torch.Tensor]:
    """The official prompt learner's learnable tensors under the plugin's parameter names."""
    out = {"text.sets.0": pl.ctx, "proj.weight": pl.proj.weight, "proj.bias": pl.proj.bias}
    for i, p in enumerate(pl.compound_prompts_text):
        out[f"text.sets.{i + 1}"] = p
    for i, layer in enumerate(pl.compound_prompt_projections):
        out[f"deep_proj.{i}.weight"], out[f"deep_proj.{i}.bias"] = layer.weight, layer.bias
    return out


def plugin(backbone):
    from benchsuite.hookspecs import SetupContext
    from benchsuite.methods import get_method, job_manager
    from benchsuite.protocols import load_protocol

    pm, method = job_manager(get_method("maple"))
    protocol = load_protocol("base2new")
    recipe = {**pm.hook.recipe(protocol=protocol, dataset="caltech101", shots=16), "prompt_depth": DEPTH}
    module = method.setup(SetupContext(backbone=backbone, classnames=CLASSNAMES, dataset="caltech101",
                                       template="a photo of a {}.", recipe=recipe, protocol=protocol, shots=16, seed=1,
                                       device=torch.device("cpu")))
    return method, module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="clone of muzairkhattak/multimodal-prompt-learning")
    args = parser.parse_args(argv)

    state = make_state_dict(seed=0, **SHAPE)
    backbone = benchsuite_backbone(state, **SHAPE)
    torch.manual_seed(1)
    trainer = official_trainer(args.official.resolve(), state)
    model = trainer.model
    method, module = plugin(backbone)
    with torch.no_grad():
        named = dict(module.named_parameters())
        for name, tensor in learnables(model.prompt_learner).items():
            named[name].copy_(tensor)
    g = torch.Generator().manual_seed(2)
    images = torch.randn(BATCH, 3, SHAPE["image_size"], SHAPE["image_size"], generator=g)
    labels = torch.tensor([0, 3, 1, 4])

    ok = True
    with torch.no_grad():
        model.eval()
        with official_runtime():
            official_logits = model(images)
        with official_runtime(half_is_identity=False):
            official_fp16_prompts = model(images)
        module.eval()
        method.prepare_eval(CLASSNAMES, "caltech101", "a photo of a {}.")
        from benchsuite.hookspecs import EvalBatch, TrainBatch

        ok &= report("eval logits", method.predict(EvalBatch(labels=labels, images=images)), official_logits)
    model.train()
    module.train()
    with torch.no_grad(), official_runtime():
        official_loss = model(images, labels)
    ok &= report("training loss (CE)", method.train_step(TrainBatch(images=images, labels=labels), 0)["loss"],
                 official_loss)

    from benchsuite.engine.train import make_optimizer

    with official_runtime():
        trainer.forward_backward({"img": images, "label": labels})
    optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad],
                               {"lr": LR, "momentum": 0.9, "weight_decay": 5e-4})
    optimizer.zero_grad(set_to_none=True)
    method.train_step(TrainBatch(images=images, labels=labels), 0)["loss"].backward()
    optimizer.step()
    named = dict(module.named_parameters())
    for name, tensor in learnables(model.prompt_learner).items():
        ok &= report(f"after one SGD step: {name}", named[name], tensor)
        ok &= report(f"  its gradient", named[name].grad, tensor.grad)
    print(f"info: official logits with its fp16 rounding of the prompts left in differ by rel.err "
          f"{relative_error(official_fp16_prompts, official_logits):.2e}")
    print("parity OK" if ok else "parity FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
