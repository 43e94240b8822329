"""Parity of the `gopro` plugin with mainaksingha01/GOPro, on tiny OpenAI-shaped weights.

Usage (the official repository is obtained separately and never committed)::

    python parity/gopro_parity.py --official /work/official/GOPro

Both sides get the same fp32 weights (`tiny_clip.make_state_dict`), class names, images, MoCo and
AugMix views, and initial learnable state (the official tensors are copied into the plugin). The
official code hard-codes 12 layers of width 768 (style/content projectors, rho = Linear(12, 1)) and a
512-wide text and joint space (sim-projector, FRG pooling), so the tiny model has those widths, 12
vision layers (2 text layers, for memory) at a 32-pixel input (5 tokens per image). Compared, each within 1e-5 relative: evaluation
logits; the training logits and total loss; every learnable tensor's gradient and value after one SGD
step (lr 0.002, momentum 0.9, weight decay 5e-4) driven by the official trainer's own
``forward_backward``. Two gradients are exactly zero in exact arithmetic (``ZERO_GRADIENT``); for them
both sides' round-off is checked to be below 1e-5 of the largest gradient.

The views are random tensors handed to both sides: the official ``mocov3`` and ``augmixtrans`` (the
augmentation code, whose quirks the plugin does not reproduce; see the plugin's docstring) are
replaced on the model instance by functions returning them. What else it takes to run the official
code here (``parity/official_import.py``): ``dassl`` is stubbed, ``pandas``/``sklearn`` (imported,
unused) are stubbed, ``.cuda()`` is a no-op, and the official ViT's cast of the pooled feature to
fp16 before its projection (``x.to(torch.float16)``, which fails in fp32 on CPU) is mapped to fp32.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_import import bare_trainer, cfg, load_trainer, official_runtime, stub_module, unused  # noqa: E402
from tiny_clip import benchsuite_backbone, make_state_dict, plugin_setup, report  # noqa: E402

SHAPE = dict(layers=12, text_layers=2, text_width=512, vision_width=768, embed_dim=512, image_size=32, patch_size=16)
CLASSNAMES = ["golden_retriever", "sea lion", "1993 Geo Metro Convertible"]
LR, BATCH = 0.002, 3
#: Gradients that are mathematically zero (their relative error compares round-off with round-off).
ZERO_GRADIENT = {
    "conditioner.rho.bias": "it adds the same constant to every coordinate of the context, which every "
                            "LayerNorm of the text encoder removes",
    "simproj.linear.bias": "the BatchNorm that follows subtracts the batch mean",
}
#: Names ``trainers/gopro.py`` imports from ``dassl`` beyond the usual ones.
EXTRA_DASSL = {"utils": {"MetricMeter": object, "AverageMeter": object, "save_checkpoint": unused}}


def stub_pandas_sklearn() -> None:
    """``pandas.DataFrame`` and ``sklearn.model_selection.train_test_split`` (imported, unused)."""
    stub_module("pandas", DataFrame=lambda *a, **k: None)
    stub_module("sklearn")
    stub_module("sklearn.model_selection", train_test_split=unused)


class _Fp32Torch(types.ModuleType):
    """`torch` as the official clip/model.py sees it, with float16 meaning float32."""

    float16 = torch.float32

    def __getattr__(self, name):
        return getattr(torch, name)


def official_trainer(repo: Path, state: dict[str, torch.Tensor], views: tuple[torch.Tensor, torch.Tensor]):
    """The official GOPro CustomCLIP on ``state`` with the given (MoCo, AugMix) views, in a bare trainer."""
    stub_pandas_sklearn()
    gopro = load_trainer(repo, "trainers/gopro.py", extra_dassl=EXTRA_DASSL)
    clip_model_module = importlib.import_module("clip.model")
    clip_model_module.torch = _Fp32Torch("torch")

    config = cfg(TRAINER={"GOPRO": {"N_CTX": 4, "CTX_INIT": "a photo of a", "PREC": "fp32"}},
                 INPUT={"SIZE": (SHAPE["image_size"],) * 2},
                 MODEL={"BACKBONE": {"NAME": "ViT-B/16"}, "INIT_WEIGHTS": ""})
    with official_runtime():
        clip_model = clip_model_module.build_model({k: v.clone() for k, v in state.items()}).float().eval()
        model = gopro.CustomCLIP(config, CLASSNAMES, clip_model)
    model.mocov3 = lambda images: views[0]
    model.augmixtrans = lambda images: views[1]
    for name, param in model.named_parameters():  # the trainer's rule
        param.requires_grad_(any(n in name for n in ("prompt_learner", "simproj")))
    trainer = bare_trainer(gopro.GOPro, model, config, LR)
    trainer.criterion = gopro.GOProLoss(T=None)
    return trainer


def learnables(model) -> dict[str, torch.Tensor]:
    """The official learnable tensors (except the unused meta-net) under the plugin's names."""
    pl = model.prompt_learner
    out = {"ctx": pl.ctx, "conditioner.rho.weight": pl.rho.weight, "conditioner.rho.bias": pl.rho.bias}
    for kind, projector in (("style", pl.style), ("content", pl.content)):
        for i, layer in enumerate(projector.linear):
            out[f"conditioner.{kind}.{i}.weight"], out[f"conditioner.{kind}.{i}.bias"] = layer.weight, layer.bias
    out["simproj.linear.weight"], out["simproj.linear.bias"] = model.simproj.linear.weight, model.simproj.linear.bias
    out["simproj.batchnorm.weight"] = model.simproj.batchnorm.weight
    out["simproj.batchnorm.bias"] = model.simproj.batchnorm.bias
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="clone of mainaksingha01/GOPro")
    args = parser.parse_args(argv)

    state = make_state_dict(seed=0, **SHAPE)
    backbone = benchsuite_backbone(state, **SHAPE)
    g = torch.Generator().manual_seed(2)
    size = SHAPE["image_size"]
    images, moco, augmix = (torch.randn(BATCH, 3, size, size, generator=g) for _ in range(3))
    labels = torch.tensor([0, 2, 1])
    torch.manual_seed(1)
    trainer = official_trainer(args.official.resolve(), state, (moco, augmix))
    model = trainer.model
    method, module, _ = plugin_setup("gopro", backbone, CLASSNAMES)
    named = dict(module.named_parameters())
    with torch.no_grad():
        for name, tensor in learnables(model).items():
            named[name].copy_(tensor)
    if set(named) != set(learnables(model)):
        print(f"BAD learnable sets differ: {sorted(set(named) ^ set(learnables(model)))}")
        return 1

    from benchsuite.hookspecs import EvalBatch, TrainBatch

    ok = True
    with torch.no_grad():
        model.eval()
        module.eval()
        official_logits = model(images, labels)[0]
        method.prepare_eval(CLASSNAMES, "caltech101", "a photo of a {}.")
        ok &= report("eval logits", method.predict(EvalBatch(labels=labels, images=images)), official_logits)
        model.train()
        module.train()
        outputs = model(images, labels)
        official_loss = trainer.criterion(*outputs)
        mine = method.losses(images, moco, augmix, labels)
        ok &= report("training logits (original view)", mine["logits"], outputs[0])
        ok &= report("training loss (CE + MSE + 0.1 SimCLR)", mine["loss"], official_loss)

    from benchsuite.engine.train import make_optimizer

    with official_runtime():
        trainer.forward_backward({"img": images, "label": labels})
    optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad],
                               {"lr": LR, "momentum": 0.9, "weight_decay": 5e-4})
    optimizer.zero_grad(set_to_none=True)
    method.train_step(TrainBatch(images=images, labels=labels, views=[moco, augmix]), 0)["loss"].backward()
    optimizer.step()
    for name, tensor in learnables(model).items():
        parts = name.split(".")
        if parts[0] == "conditioner" and parts[1] in ("style", "content") and parts[2] not in ("0", "11"):
            continue  # layers 1-10 behave like 0 and 11; keep the report short
        if name in ZERO_GRADIENT:  # round-off on both sides; compare with the gradients' scale instead
            scale = max(float(t.grad.abs().max()) for t in learnables(model).values() if t.grad is not None)
            worst = max(float(named[name].grad.abs().max()), float(tensor.grad.abs().max()))
            good = worst <= 1e-5 * scale
            ok &= good
            print(f"{'OK ' if good else 'BAD'} gradient: {name:<30} zero on both sides: max |g| {worst:.1e} "
                  f"<= 1e-5 x {scale:.1e} ({ZERO_GRADIENT[name]})")
        else:
            ok &= report(f"gradient: {name}", named[name].grad, tensor.grad)
        ok &= report(f"after one SGD step: {name}", named[name], tensor)
    print("parity OK" if ok else "parity FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
