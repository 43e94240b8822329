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

What it takes to run the official code here (methods.md 7.12; ``parity/official_import.py``):
``dassl`` is stubbed (only the model classes and ``forward_backward`` run), ``.cuda()`` is a no-op. The official
forward rounds every vision and deep text prompt with ``.half()`` even in fp32 mode, and casts the
shallow coupling to fp16 at build time (then its fp32 path fails: fp16 weights x fp32 context); while
the official model runs, ``Tensor.half``/``Module.half`` are the identity, which makes it fp32
throughout. The last line reports, for information, how far the official logits move with the fp16
rounding of the prompts left in.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_import import bare_trainer, cfg, load_trainer, official_runtime  # noqa: E402
from tiny_clip import benchsuite_backbone, make_state_dict, plugin_setup, relative_error, report  # noqa: E402

SHAPE = dict(layers=4, text_width=512, vision_width=768, embed_dim=64, image_size=64, patch_size=16)
CLASSNAMES = ["golden_retriever", "cat", "sea lion", "airplane_cabin", "1993 Geo Metro Convertible"]
DEPTH, N_CTX, LR, BATCH = 3, 2, 0.0035, 4


def official_trainer(repo: Path, state: dict[str, torch.Tensor]):
    """The official MaPLe CustomCLIP on ``state``, frozen by the trainer's rule, in a bare trainer."""
    maple = load_trainer(repo, "trainers/maple.py")
    config = cfg(TRAINER={"MAPLE": {"N_CTX": N_CTX, "CTX_INIT": "a photo of a", "PREC": "fp32",
                                    "PROMPT_DEPTH": DEPTH}},
                 INPUT={"SIZE": (SHAPE["image_size"],) * 2},
                 MODEL={"BACKBONE": {"NAME": "ViT-B/16"}, "INIT_WEIGHTS": ""})
    design = {"trainer": "MaPLe", "vision_depth": 0, "language_depth": 0, "vision_ctx": 0, "language_ctx": 0,
              "maple_length": N_CTX}
    with official_runtime(half_is_identity=True):
        clip_model = maple.clip.build_model({k: v.clone() for k, v in state.items()}, design).float().eval()
        model = maple.CustomCLIP(config, CLASSNAMES, clip_model)
    for name, param in model.named_parameters():  # the trainer's rule
        param.requires_grad_("prompt_learner" in name or "VPT" in name)
    return bare_trainer(maple.MaPLe, model, config, LR)


def learnables(pl) -> dict[str, torch.Tensor]:
    """The official prompt learner's learnable tensors under the plugin's parameter names."""
    out = {"text.sets.0": pl.ctx, "proj.weight": pl.proj.weight, "proj.bias": pl.proj.bias}
    for i, p in enumerate(pl.compound_prompts_text):
        out[f"text.sets.{i + 1}"] = p
    for i, layer in enumerate(pl.compound_prompt_projections):
        out[f"deep_proj.{i}.weight"], out[f"deep_proj.{i}.bias"] = layer.weight, layer.bias
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="clone of muzairkhattak/multimodal-prompt-learning")
    args = parser.parse_args(argv)

    state = make_state_dict(seed=0, **SHAPE)
    backbone = benchsuite_backbone(state, **SHAPE)
    torch.manual_seed(1)
    trainer = official_trainer(args.official.resolve(), state)
    model = trainer.model
    method, module, _ = plugin_setup("maple", backbone, CLASSNAMES, prompt_depth=DEPTH)
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
        with official_runtime(half_is_identity=True):
            official_logits = model(images)
        with official_runtime():
            official_fp16_prompts = model(images)
        module.eval()
        method.prepare_eval(CLASSNAMES, "caltech101", "a photo of a {}.")
        from benchsuite.hookspecs import EvalBatch, TrainBatch

        ok &= report("eval logits", method.predict(EvalBatch(labels=labels, images=images)), official_logits)
    model.train()
    module.train()
    with torch.no_grad(), official_runtime(half_is_identity=True):
        official_loss = model(images, labels)
    ok &= report("training loss (CE)", method.train_step(TrainBatch(images=images, labels=labels), 0)["loss"],
                 official_loss)

    from benchsuite.engine.train import make_optimizer

    with official_runtime(half_is_identity=True):
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
