"""Parity of the `ivlp` and `promptsrc` plugins with muzairkhattak/PromptSRC, on tiny OpenAI-shaped weights.

Usage (the official repository is obtained separately and never committed)::

    python parity/ivlp_promptsrc_parity.py --official /work/official/PromptSRC

Both sides get the same fp32 weights (`tiny_clip.make_state_dict`), class names, images and initial
prompts (the official model's prompt tensors are copied into the plugin). Compared, each within 1e-5
relative: evaluation logits; the training loss; every prompt set after one SGD step (lr 0.0025,
momentum 0.9, weight decay 5e-4) driven by the official trainer's own ``forward_backward``; and for
PromptSRC the Gaussian-aggregated prompts and logits after a few one-batch epochs, each epoch starting
the plugin from the official prompts (so the check isolates the aggregation from the drift of
training side by side, which is printed).

What it takes to run the official code here (methods.md 7.12; ``parity/official_import.py``):
``dassl`` is stubbed (only the trainers' model classes and ``forward_backward`` run), ``.cuda()`` is a no-op,
``clip._download`` points at a local state dict. The official forward casts every prompt set (and
PromptSRC's text anchors) with ``.half()`` even in fp32 mode, so its fp32 path does not run as
shipped (fp16 x fp32 matmul); while the official model runs, ``.half()`` is the identity, which
makes both sides fp32. PromptSRC's ``ZS_image_encoder`` is built in fp16 by the official code and is
cast to fp32 here for the same reason.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_import import bare_trainer, cfg, load_trainer, local_weights, official_runtime  # noqa: E402
from tiny_clip import benchsuite_backbone, make_state_dict, plugin_setup, relative_error, report  # noqa: E402

SHAPE = dict(layers=4, text_width=128, vision_width=128, embed_dim=64, image_size=64, patch_size=16)
CLASSNAMES = ["golden_retriever", "cat", "sea lion", "airplane_cabin", "1993 Geo Metro Convertible"]
DEPTH = 3  # < 4 blocks: the blocks after the prompted ones are exercised too
LR, BATCH = 0.0025, 4


# ---- running the official code -----------------------------------------------------------------
def official_cfg(trainer: str, epochs: int, gpa=(2, 1)) -> SimpleNamespace:
    node = {"N_CTX_VISION": 4, "N_CTX_TEXT": 4, "CTX_INIT": "a photo of a", "PREC": "fp32",
            "PROMPT_DEPTH_VISION": DEPTH, "PROMPT_DEPTH_TEXT": DEPTH}
    if trainer == "PROMPTSRC":
        node.update(TEXT_LOSS_WEIGHT=25, IMAGE_LOSS_WEIGHT=10, GPA_MEAN=gpa[0], GPA_STD=gpa[1])
    return cfg(MODEL={"BACKBONE": {"NAME": "ViT-B/16"}, "INIT_WEIGHTS": ""}, INPUT={"SIZE": (SHAPE["image_size"],) * 2},
               OPTIM={"MAX_EPOCH": epochs}, TRAINER={trainer: node})


def official_trainer(module, trainer_cls: str, config: SimpleNamespace, classnames: list[str]):
    """The official CustomCLIP, frozen as the trainer's build_model freezes it, inside a bare trainer
    object whose `forward_backward` is the official one (one batch = one epoch, constant lr)."""
    with official_runtime(half_is_identity=True):
        clip_model = module.load_clip_to_cpu(config)
        clip_model.float()  # the trainers' fp32 / amp branch
        model = module.CustomCLIP(config, classnames, clip_model)
    if hasattr(model.prompt_learner, "ZS_image_encoder"):
        model.prompt_learner.ZS_image_encoder.float()  # built in fp16 by the official code
    for name, param in model.named_parameters():  # the trainer's rule
        learnable = ("prompt_learner" in name and "ZS_image_encoder" not in name) or "VPT" in name
        param.requires_grad_(learnable)
    trainer = bare_trainer(getattr(module, trainer_cls), model, config, LR)
    if hasattr(trainer, "get_gauss"):  # PromptSRC's GPA state, as its build_model sets it up
        node = config.TRAINER.PROMPTSRC
        gauss = trainer.get_gauss(node.GPA_MEAN, node.GPA_STD)
        weights = [gauss(e) for e in range(1, config.OPTIM.MAX_EPOCH + 1)]
        trainer.gauss = [w / sum(weights) for w in weights]
        trainer.step_counter, trainer.previous_model_gpa = 1, None
    return trainer


def official_prompts(model) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    text = [model.prompt_learner.ctx] + [model.text_encoder.transformer.resblocks[i].VPT_shallow
                                         for i in range(1, DEPTH)]
    vision = [model.image_encoder.VPT] + [model.image_encoder.transformer.resblocks[i].VPT_shallow
                                          for i in range(1, DEPTH)]
    return text, vision


# ---- the plugin side ---------------------------------------------------------------------------
def plugin(name: str, backbone, epochs: int, gpa=(2, 1)):
    from benchsuite.engine.train import make_optimizer

    gpa_settings = {"gpa_mean": gpa[0], "gpa_std": gpa[1]} if name == "promptsrc" else {}
    method, module, recipe = plugin_setup(name, backbone, CLASSNAMES, prompt_depth_text=DEPTH, prompt_depth_vision=DEPTH,
                                          epochs=epochs, lr=LR, momentum=0.9, weight_decay=5e-4, **gpa_settings)
    optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad], recipe)
    return method, module, optimizer


def eval_logits_plugin(method, images):
    from benchsuite.hookspecs import EvalBatch

    method.learner.eval()
    with torch.no_grad():
        method.prepare_eval(CLASSNAMES, "caltech101", "a photo of a {}.")
        return method.predict(EvalBatch(labels=torch.zeros(len(images), dtype=torch.long), images=images))


def eval_logits_official(model, images):
    model.eval()
    with torch.no_grad(), official_runtime(half_is_identity=True):
        return model(images)


def plugin_step(method, module, optimizer, images, labels):
    from benchsuite.hookspecs import TrainBatch

    module.train()
    out = method.train_step(TrainBatch(images, labels), 0)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    optimizer.step()
    return out


def official_step(trainer, images, labels) -> float:
    trainer.model.train()
    with official_runtime(half_is_identity=True):
        return trainer.forward_backward({"img": images, "label": labels})["loss"]


def compare_prompts(tag: str, official, module) -> bool:
    text, vision = official
    ok = True
    for i, (o, p) in enumerate(zip(text, module.text.sets)):
        ok &= report(f"{tag}: text prompt set {i}", p, o)
    for i, (o, p) in enumerate(zip(vision, module.vision.sets)):
        ok &= report(f"{tag}: vision prompt set {i}", p, o)
    return ok and len(text) == module.text.depth and len(vision) == module.vision.depth


def run(name: str, official_module, trainer_cls: str, cfg_name: str, backbone, images, labels, epochs: int) -> bool:
    print(f"== {name} (depth {DEPTH}/{DEPTH}, 4+4 tokens, {len(CLASSNAMES)} classes, batch {BATCH})")
    trainer = official_trainer(official_module, trainer_cls, official_cfg(cfg_name, epochs), CLASSNAMES)
    method, module, optimizer = plugin(name, backbone, epochs)
    text, vision = official_prompts(trainer.model)
    ok = report(f"{name}: word-initialised text context", module.text.sets[0], text[0])
    with torch.no_grad():  # same initial random prompt sets on both sides
        for p, o in zip(list(module.text.sets) + list(module.vision.sets), text + vision):
            p.copy_(o)
    ok &= report(f"{name}: eval logits at init", eval_logits_plugin(method, images),
                 eval_logits_official(trainer.model, images))
    loss = plugin_step(method, module, optimizer, images, labels)["loss"]
    official_loss = official_step(trainer, images, labels)
    ok &= report(f"{name}: training loss (first step)", loss.detach(), torch.tensor(official_loss))
    ok &= compare_prompts(f"{name} after one SGD step", (text, vision), module)
    if name == "promptsrc":
        # GPA is compared on per-epoch snapshots that differ by one step's rounding only: each later epoch
        # starts the plugin from the official prompts, so the aggregate isolates the aggregation from the
        # drift of training side by side (printed as info; the logits at logit scale 100 amplify it)
        method.epoch_end(0, epochs)
        for epoch in range(1, epochs):
            text, vision = official_prompts(trainer.model)
            pairs = list(zip(list(module.text.sets) + list(module.vision.sets), text + vision))
            drift = max(relative_error(p, o) for p, o in pairs)
            print(f"info: promptsrc before epoch {epoch + 1}: prompts trained side by side differ by "
                  f"rel.err {drift:.2e}; the plugin continues from the official ones")
            with torch.no_grad():
                for p, o in pairs:
                    p.copy_(o)
            plugin_step(method, module, optimizer, images, labels)
            method.epoch_end(epoch, epochs)
            official_step(trainer, images, labels)
        method.train_end()
        text, vision = official_prompts(trainer.model)
        ok &= compare_prompts(f"{name} after GPA over {epochs} epochs", (text, vision), module)
        ok &= report(f"{name}: eval logits after GPA", eval_logits_plugin(method, images),
                     eval_logits_official(trainer.model, images))
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="a clone of muzairkhattak/PromptSRC")
    parser.add_argument("--epochs", type=int, default=4, help="PromptSRC epochs of one batch for the GPA check")
    args = parser.parse_args(argv)
    state = make_state_dict(seed=0, **SHAPE)
    ivlp_official = load_trainer(args.official, "trainers/independentVL.py")
    promptsrc_official = load_trainer(args.official, "trainers/promptsrc.py")
    local_weights(ivlp_official.clip, state, Path(tempfile.mkdtemp(prefix="bs-parity-ivlp-")))

    backbone = benchsuite_backbone(state, **SHAPE)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, SHAPE["image_size"], SHAPE["image_size"], generator=gen)
    labels = torch.tensor([0, 3, 1, 4])
    torch.manual_seed(0)
    ok = run("ivlp", ivlp_official, "IVLP", "IVLP", backbone, images, labels, 1)
    torch.manual_seed(0)
    ok &= run("promptsrc", promptsrc_official, "PromptSRC", "PROMPTSRC", backbone, images, labels, args.epochs)
    print("PARITY OK" if ok else "PARITY FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
