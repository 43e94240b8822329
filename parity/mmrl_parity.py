"""Parity of the `mmrl` plugin with yunncheng/MMRL (``trainers/mmrl.py``, ``clip/model_mmrl.py``), fp32, CPU.

Usage (the official repository is obtained separately and never committed)::

    python parity/mmrl_parity.py --official /tmp/official/MMRL

Followed at commit 27d8821f6ac135a1d0c8e4c5ed78af14df0cd82e. Both sides get the same tiny OpenAI-shaped
weights (`tiny_clip.make_state_dict`, 4 + 4 blocks), class names, images and initial learnables (the
official tensors are copied into the plugin: the official draws ``proj_rep`` while building CLIP, so
the random streams cannot line up). The official trainer's own ``build_model`` (freezing rule, frozen
text anchors, ``MMRL_Loss``; Dassl's ``build_optimizer`` AdamW, re-stated here since Dassl is not
installed), ``forward_backward`` and ``test()`` run unchanged; the plugin runs its hooks and the
harness's optimizer (``make_optimizer``: AdamW, lr 1e-3, betas 0.9/0.999, weight decay 5e-4).

Compared, each within 1e-5 relative, for REP_LAYERS [2, 3, 4] (the configs' "upper blocks") and [1, 3]
(insertion before the first block, a block without tokens in between):
1. the trainable tensors (the same set), the training logits of both heads, each loss part (the two
   cross-entropies and the two cosine regularisers, recorded inside the official ``F``) and the total,
   the gradient of every learned tensor, and every learned tensor after the first AdamW step: all its
   elements whose gradient is at least 1e-4 of its tensor's largest (AdamW's first update
   lr * g / (|g| + 1e-8) turns the round-off of a near-zero gradient into a visible share of lr; those
   elements, 0.1-0.2 % of each weight matrix here, are counted and printed as info), and all elements of the same step
   taken from the official gradients (the harness's optimizer is Dassl's AdamW);
2. ([2, 3, 4]) the official ``test()`` outputs against ``prepare_eval`` + ``predict`` with the harness's
   ``LabelSpace``: base-to-new base (fused) and new (class token), few-shot (fused), cross-dataset on
   the source "ImageNet" (fused) and on DTD (class token), domain generalisation on ImageNetV2 (class
   token). The official evaluation models are built per class set and load the trained weights as its
   ``load_model`` does (``prompt_embeddings`` dropped, strict=False).

What it takes to run the official code here (methods.md 7.12; ``parity/official_import.py``): ``dassl``
stubbed, ``.cuda()`` a no-op, ``clip._download`` pointed at a local state dict, Dassl's
``compute_accuracy`` replaced by a stub (only the printed accuracy uses it), the trainer object made
without Dassl's ``__init__`` (its ``register_model``, ``set_model_mode``, evaluator and loaders are
small stand-ins). PREC "fp32" (the configs' "amp" is CUDA autocast over the same fp32 model).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import types
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_import import cfg, load_trainer, local_weights, official_runtime  # noqa: E402
from tiny_clip import benchsuite_backbone, make_state_dict, plugin_setup, report  # noqa: E402

SHAPE = dict(layers=4, text_width=128, vision_width=128, embed_dim=64, image_size=64, patch_size=16)
BASE = ["golden_retriever", "cat", "sea lion", "airplane_cabin", "1993 Geo Metro Convertible"]
NEW = ["tractor", "kite", "polka_dotted"]
DTD = ["banded", "blotchy", "braided", "bubbly"]
PHOTO = "a photo of a {}."
LR, BATCH, ALPHA, REG, REP_DIM, K = 1e-3, 4, 0.7, 0.5, 512, 5


# ---- the official side -------------------------------------------------------------------------
def dassl_adamw(model, optim_cfg):
    """Dassl's ``build_optimizer`` for NAME "adamw" without staged lr (Dassl.pytorch
    ``dassl/optim/optimizer.py``): AdamW over ``model.parameters()``, betas (ADAM_BETA1, ADAM_BETA2)."""
    return torch.optim.AdamW(model.parameters(), lr=optim_cfg.LR, weight_decay=optim_cfg.WEIGHT_DECAY,
                             betas=(optim_cfg.ADAM_BETA1, optim_cfg.ADAM_BETA2))


def official_cfg(rep_layers, dataset: str, task: str, sub: str = "base") -> SimpleNamespace:
    return cfg(MODEL={"BACKBONE": {"NAME": "ViT-B/16"}, "INIT_WEIGHTS": ""}, INPUT={"SIZE": (SHAPE["image_size"],) * 2},
               OPTIM={"NAME": "adamw", "LR": LR, "WEIGHT_DECAY": 5e-4, "ADAM_BETA1": 0.9, "ADAM_BETA2": 0.999},
               DATASET={"NAME": dataset, "SUBSAMPLE_CLASSES": sub}, TASK=task, TEST={"SPLIT": "test"},
               TRAINER={"MMRL": {"ALPHA": ALPHA, "REG_WEIGHT": REG, "REP_LAYERS": list(rep_layers), "REP_DIM": REP_DIM,
                                 "N_REP_TOKENS": K, "PREC": "fp32"}})


class Evaluator:
    def __init__(self):
        self.outputs = []

    def reset(self):
        self.outputs = []

    def process(self, output, label):
        self.outputs.append(output.detach().clone())

    def evaluate(self):
        return {"accuracy": 0.0}


def official_trainer(module, config, classnames):
    """The official MMRL trainer built by its own ``build_model``, without Dassl's ``__init__``."""
    trainer = object.__new__(module.MMRL)
    trainer.cfg, trainer.device = config, torch.device("cpu")
    trainer.dm = SimpleNamespace(dataset=SimpleNamespace(classnames=list(classnames)))
    trainer.register_model = lambda *a, **k: None
    trainer.batch_idx, trainer.num_batches, trainer.update_lr, trainer.epoch = 0, 1, lambda: None, 0
    trainer.evaluator, trainer.val_loader, trainer.write_scalar = Evaluator(), None, lambda *a, **k: None
    trainer.parse_batch_test = lambda batch: (batch["img"], batch["label"])
    trainer.set_model_mode = lambda mode: trainer.model.train(mode == "train")
    with official_runtime(), contextlib.redirect_stdout(io.StringIO()):
        trainer.build_model()
    return trainer


def official_test(trainer, images) -> torch.Tensor:
    trainer.model.text_features_for_inference = None  # the official cache, filled at the first test batch
    trainer.test_loader = [{"img": images, "label": torch.zeros(len(images), dtype=torch.long)}]
    with official_runtime(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer.test()
    return torch.cat(trainer.evaluator.outputs)


def official_eval_model(module, trained, rep_layers, dataset, task, sub, classnames, images):
    """An official evaluation run: a model for this class set, the trained weights loaded as ``load_model``."""
    trainer = official_trainer(module, official_cfg(rep_layers, dataset, task, sub), classnames)
    state = {k: v for k, v in trained.model.state_dict().items() if "prompt_embeddings" not in k}
    trainer.model.load_state_dict(state, strict=False)
    return official_test(trainer, images)


def official_names(j: int) -> dict[str, str]:
    return {"representation_learner.compound_rep_tokens": "tokens", "image_encoder.proj_rep": "proj_rep",
            **{f"representation_learner.compound_rep_tokens_r2vproj.{i}.{w}": f"to_vision.{i}.{w}"
               for i in range(j) for w in ("weight", "bias")},
            **{f"representation_learner.compound_rep_tokens_r2tproj.{i}.{w}": f"to_text.{i}.{w}"
               for i in range(j) for w in ("weight", "bias")}}


def recording(seen: dict) -> types.SimpleNamespace:
    """``torch.nn.functional`` whose cross_entropy and cosine_similarity record their inputs and results."""
    functional = types.SimpleNamespace(**{n: getattr(torch.nn.functional, n) for n in dir(torch.nn.functional)
                                          if not n.startswith("__")})

    def cross_entropy(logits, target, *a, **k):
        loss = torch.nn.functional.cross_entropy(logits, target, *a, **k)
        seen["ce"].append((logits.detach().clone(), loss.detach().clone()))
        return loss

    def cosine_similarity(a, b, *args, **kwargs):
        out = torch.nn.functional.cosine_similarity(a, b, *args, **kwargs)
        seen["cos"].append(out.detach().clone())
        return out

    functional.cross_entropy, functional.cosine_similarity = cross_entropy, cosine_similarity
    return functional


# ---- the comparison ----------------------------------------------------------------------------
#: AdamW's first step is lr * g / (|g| + eps), eps = 1e-8: where |g| is within a few orders of eps, the
#: gradients' last-bit differences (rel. 1e-6 of the largest) move the update by a sizeable part of lr.
#: Elements with |g| >= CONDITIONED * max |g| of their tensor are compared at 1e-5 (there the gradients'
#: round-off, ~1e-6 of the largest, moves the update by < 1e-7 relative); the others are counted and shown.
CONDITIONED = 1e-4


def well_conditioned_step(name: str, mine: torch.Tensor, official: torch.Tensor) -> bool:
    keep = official.grad.abs() >= CONDITIONED * official.grad.abs().max()
    ok = report(f"after the AdamW step: {name}", mine[keep], official[keep])
    loose = ~keep
    if loose.any():
        diff = (mine - official).detach().abs()[loose]
        print(f"info:   {name}: {int(loose.sum())} of {official.numel()} elements with |grad| < {CONDITIONED:.0e} x "
              f"max: updates differ by up to {float(diff.max()):.1e} (lr {LR:.0e})")
    return ok


def run(official_module, backbone, rep_layers, images, labels, evals: bool) -> bool:
    from benchsuite.engine.train import make_optimizer
    from benchsuite.hookspecs import EvalBatch, LabelSpace, TrainBatch

    import benchsuite_plugins.mmrl as plugin_module

    print(f"== REP_LAYERS {list(rep_layers)} ({K} tokens, rep_dim {REP_DIM}, {len(BASE)} classes, batch {BATCH})")
    trainer = official_trainer(official_module, official_cfg(rep_layers, "Caltech101", "B2N"), BASE)
    method, module, recipe = plugin_setup("mmrl", backbone, BASE, dataset="caltech101", template=PHOTO,
                                          rep_layers=list(rep_layers), reg_weight=REG, rep_dim=REP_DIM)
    assert recipe["optimizer"] == "adamw" and recipe["lr"] == LR and recipe["alpha"] == ALPHA
    names = official_names(len(rep_layers))
    official_params = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    mine = dict(module.named_parameters())
    same = set(official_params) == set(names) and set(mine) == set(names.values())
    print(f"{'OK ' if same else 'BAD'} trainable tensors: official {len(official_params)}, plugin {len(mine)} "
          f"({sum(p.numel() for p in official_params.values())} values)")
    ok = same
    clones = all(torch.equal(trainer.model.representation_learner.compound_rep_tokens_r2vproj[0].weight,
                             trainer.model.representation_learner.compound_rep_tokens_r2vproj[i].weight)
                 for i in range(len(rep_layers)))
    print(f"info: official per-layer projections start identical (deep copies of one Linear): {clones}; "
          f"plugin: {all(torch.equal(module.to_vision[0].weight, m.weight) for m in module.to_vision)}")
    with torch.no_grad():
        for o, p in names.items():
            mine[p].copy_(official_params[o])
    before = {p: t.detach().clone() for p, t in mine.items()}
    ok &= report("frozen text anchors (training classes)", method.anchors, trainer.text_features_clip)

    # one step on each side
    seen: dict = {"ce": [], "cos": []}
    saved = official_module.F, plugin_module.F
    official_module.F = recording(seen)
    trainer.model.train()
    try:
        with official_runtime():
            official_loss = trainer.forward_backward({"img": images, "label": labels})["loss"]
    finally:
        official_module.F = saved[0]
    mine_seen: dict = {"ce": [], "cos": []}
    plugin_module.F = recording(mine_seen)
    try:
        module.train()
        optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad], recipe)
        with torch.no_grad():
            frozen = backbone.encode_image(images)
        out = method.train_step(TrainBatch(images, labels, frozen), 0)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
    finally:
        plugin_module.F = saved[1]
    ok &= report("training logits (class token)", mine_seen["ce"][0][0], seen["ce"][0][0])
    ok &= report("training logits (representation)", mine_seen["ce"][1][0], seen["ce"][1][0])
    parts = {"ce": seen["ce"][0][1], "ce_rep": seen["ce"][1][1], "reg_image": 1 - seen["cos"][0].mean(),
             "reg_text": 1 - seen["cos"][1].mean()}
    for part, value in parts.items():
        ok &= report(f"loss part {part}", out[part].detach(), value)
    ok &= report("total loss", out["loss"].detach(), torch.tensor(official_loss))
    for o, p in names.items():
        ok &= report(f"gradient {p}", mine[p].grad, official_params[o].grad)
    for o, p in names.items():
        ok &= well_conditioned_step(p, mine[p], official_params[o])
    # the same step from identical gradients: the harness's AdamW is Dassl's (lr, betas, eps, weight decay)
    with torch.no_grad():
        for o, p in names.items():
            mine[p].copy_(before[p])
            mine[p].grad.copy_(official_params[o].grad)
    again = make_optimizer([mine[p] for p in names.values()], recipe)
    again.step()
    for o, p in names.items():
        ok &= report(f"after the AdamW step from the official gradient: {p}", mine[p], official_params[o])
    if not evals:
        return ok

    def plugin_eval(classes, train_dataset, dataset, template):
        space = LabelSpace.of(train_dataset, BASE, dataset, classes)
        module.eval()
        with torch.no_grad():
            method.prepare_eval(classes, dataset, template, space)
            return method.predict(EvalBatch(labels=torch.zeros(len(images), dtype=torch.long), images=images)), \
                method.head

    cases = [("B2N base", "Caltech101", "B2N", "base", BASE, ("caltech101", "caltech101", PHOTO), "fused"),
             ("B2N new", "Caltech101", "B2N", "new", NEW, ("caltech101", "caltech101", PHOTO), "class"),
             ("few-shot", "Caltech101", "FS", "all", BASE, ("caltech101", "caltech101", PHOTO), "fused"),
             ("cross-dataset source ImageNet", "ImageNet", "CD", "all", BASE, ("imagenet", "imagenet", PHOTO), "fused"),
             ("cross-dataset target DTD", "DescribableTextures", "CD", "all", DTD, ("imagenet", "dtd", "{} texture."),
              "class"),
             ("domain generalisation ImageNetV2", "ImageNetV2", "CD", "all", BASE,
              ("imagenet", "imagenetv2", PHOTO), "class")]
    for what, dataset, task, sub, classes, (train_ds, ds, template), head in cases:
        if what == "B2N base":
            official = official_test(trainer, images)
        else:
            official = official_eval_model(official_module, trainer, rep_layers, dataset, task, sub, classes, images)
        logits, chosen = plugin_eval(classes, train_ds, ds, template)
        ok &= report(f"test logits, {what} ({chosen})", logits, official)
        ok &= chosen == head
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="a clone of yunncheng/MMRL")
    args = parser.parse_args(argv)
    accuracy = {"compute_accuracy": lambda output, label, topk=(1,): [torch.zeros(())]}
    official = load_trainer(args.official, "trainers/mmrl.py", extra_dassl={"metrics": accuracy,
                                                                            "optim": {"build_optimizer": dassl_adamw,
                                                                                      "build_lr_scheduler":
                                                                                          lambda *a, **k: None}})
    state = make_state_dict(seed=0, **SHAPE)
    local_weights(official.clip, state, Path(tempfile.mkdtemp(prefix="bs-parity-mmrl-")))
    backbone = benchsuite_backbone(state, **SHAPE)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, SHAPE["image_size"], SHAPE["image_size"], generator=gen)
    labels = torch.tensor([0, 3, 1, 4])
    torch.manual_seed(0)
    ok = run(official, backbone, (2, 3, 4), images, labels, evals=True)
    torch.manual_seed(1)
    ok &= run(official, backbone, (1, 3), images, labels, evals=False)
    print("PARITY OK" if ok else "PARITY FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
