"""Parity of the `coprompt` plugin with ShuvenduRoy/CoPrompt, on tiny OpenAI-shaped weights.

Usage (the official repository is obtained separately and never committed)::

    python parity/coprompt_parity.py --official /tmp/official/CoPrompt

Both sides get the same fp32 weights (`tiny_clip.make_state_dict`), class names, LLM descriptions (a
small JSON file this script writes, read by the official ``gpt_clip_classifier`` and by the plugin
through its ``descriptions`` option), images (two views) and initial learnable state (the official
prompt learner's and adapters' tensors are copied into the plugin). The official code hard-codes text
width 512, vision width 768 and an adapter width 512, so the tiny model has those widths and a
512-wide embedding, 4 layers and prompt depth 3 (blocks after the prompted ones are exercised too).

The description index of a step: the official ``CustomCLIP.forward`` draws it with Python's
``random.randint``; the script records each draw and hands the same index to the plugin (whose own
draws come from its seeded generator), so both sides use the same target.

Compared, each within 1e-5 relative: the description targets (``clip_weights``), evaluation logits,
the training logits, the training loss and its three parts (CE, text and image consistency; the
official forward returns only the total, so its parts are recorded from its own
``F.cross_entropy`` and ``nn.CosineSimilarity`` calls), and every learnable tensor's gradient and
value after one SGD step (lr 0.0035, momentum 0.9, weight decay 5e-4) driven by the official
trainer's own ``forward_backward``.

What it takes to run the official code here (methods.md 7.12; ``parity/official_import.py``):
``dassl`` is stubbed (only the model classes, ``gpt_clip_classifier`` and ``forward_backward`` run),
``.cuda()`` is a no-op, ``gpt_clip_classifier`` writes its ``cache/`` into a temporary working
directory. The official forward rounds every vision and deep text prompt with ``.half()`` even in
fp32 mode (MaPLe's ``clip/model.py``); while the official model runs, ``Tensor.half``/``Module.half``
are the identity, which makes it fp32 throughout (``PREC: "fp32"``, both CLIPs cast with ``.float()``).
The last line reports, for information, how far the official logits move with the fp16 rounding of
the prompts left in.

Not compared: the augmentations (the official config's RandAugment views vs the protocol's transform
drawn twice, a documented deviation; both sides here get the same two view tensors) and the official
fp16 training (``PREC: "fp16"``: fp16 adapters and prompts under plain SGD), which the plugin replaces
by fp32 masters.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_import import bare_trainer, cfg, load_trainer, official_runtime, recording_functional  # noqa: E402
from tiny_clip import benchsuite_backbone, make_state_dict, plugin_setup, relative_error, report  # noqa: E402

SHAPE = dict(layers=4, text_width=512, vision_width=768, embed_dim=512, image_size=64, patch_size=16)
CLASSNAMES = ["golden_retriever", "cat", "sea lion", "airplane_cabin", "1993 Geo Metro Convertible"]
DESCRIPTIONS = {
    "golden retriever": ["a friendly dog with a golden coat.", "a large retriever with feathered fur.",
                         "a dog with floppy ears and a wagging tail."],
    "cat": ["a small feline with whiskers.", "a cat curled up on a sofa.", "a pet with pointed ears and soft fur."],
    "sea lion": ["a marine mammal with flippers.", "a sea lion resting on rocks by the sea.",
                 "a sleek brown animal barking on a beach."],
    "airplane cabin": ["rows of seats inside an aircraft.", "a narrow aisle between airplane seats.",
                       "the interior of a passenger jet with overhead bins."],
    "1993 Geo Metro Convertible": ["a small two-door car with a soft top.", "a compact convertible from the nineties.",
                                   "a tiny hatchback-like car with its roof down."],
}
DEPTH, N_CTX, LR, BATCH = 3, 2, 0.0035, 4


@contextlib.contextmanager
def working_directory(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def recording_cosine(seen: list):
    """``torch.nn.CosineSimilarity`` records every score it computes (the official loss parts)."""
    original = torch.nn.CosineSimilarity

    class Recording(original):
        def forward(self, a, b):
            out = super().forward(a, b)
            seen.append(out.detach().clone())
            return out

    torch.nn.CosineSimilarity = Recording
    try:
        yield
    finally:
        torch.nn.CosineSimilarity = original


def official_trainer(repo: Path, state: dict[str, torch.Tensor], workdir: Path):
    """The official CoPrompt CustomCLIP on ``state``, frozen by the trainer's rule, in a bare trainer; and
    the module (for its `random` and `F`)."""
    coprompt = load_trainer(repo, "trainers/coprompt.py")
    config = cfg(TRAINER={"CoPrompt": {"N_CTX": N_CTX, "CTX_INIT": "a photo of a", "PREC": "fp32",
                                       "PROMPT_DEPTH": DEPTH}, "W": 1.0, "DISTILL": "cosine"},
                 DATASET={"NAME": "Caltech101"}, INPUT={"SIZE": (SHAPE["image_size"],) * 2},
                 MODEL={"BACKBONE": {"NAME": "ViT-B/16"}, "INIT_WEIGHTS": ""})
    base = {"vision_depth": 0, "language_depth": 0, "vision_ctx": 0, "language_ctx": 0}
    with official_runtime(half_is_identity=True), working_directory(workdir):
        # build_model as load_clip_to_cpu calls it, then the trainer's fp32 branch (.float() on both)
        clip_model = coprompt.clip.build_model({k: v.clone() for k, v in state.items()},
                                               {"trainer": "CoPrompt", **base, "maple_length": N_CTX}).float().eval()
        distill = coprompt.clip.build_model({k: v.clone() for k, v in state.items()},
                                            {"trainer": "CoOp", **base}).float().eval()
        clip_weights = coprompt.gpt_clip_classifier(CLASSNAMES, DESCRIPTIONS, distill, "Caltech101")
        model = coprompt.CustomCLIP(config, CLASSNAMES, clip_model, distill, clip_weights)
    for name, param in model.named_parameters():  # the trainer's rule
        param.requires_grad_("prompt_learner" in name or "adapter" in name)
    return coprompt, bare_trainer(coprompt.CoPrompt, model, config, LR)


def learnables(model) -> dict[str, torch.Tensor]:
    """The official learnable tensors under the plugin's parameter names."""
    pl = model.prompt_learner
    out = {"prompts.text.sets.0": pl.ctx, "prompts.proj.weight": pl.proj.weight, "prompts.proj.bias": pl.proj.bias}
    for i, p in enumerate(pl.compound_prompts_text):
        out[f"prompts.text.sets.{i + 1}"] = p
    for i, layer in enumerate(pl.compound_prompt_projections):
        out[f"prompts.deep_proj.{i}.weight"], out[f"prompts.deep_proj.{i}.bias"] = layer.weight, layer.bias
    for side in ("image", "text"):
        adapter = getattr(model, f"adapter_{side}")
        out[f"adapter_{side}.fc.0.weight"], out[f"adapter_{side}.fc.2.weight"] = adapter.fc[0].weight, adapter.fc[2].weight
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="clone of ShuvenduRoy/CoPrompt")
    args = parser.parse_args(argv)

    from benchsuite.engine.train import make_optimizer
    from benchsuite.hookspecs import EvalBatch, TrainBatch
    from benchsuite_plugins.coprompt import file_sha256

    workdir = Path(tempfile.mkdtemp(prefix="bs-coprompt-parity-"))
    desc_file = workdir / "descriptions.json"
    desc_file.write_text(json.dumps(DESCRIPTIONS), encoding="utf-8")

    state = make_state_dict(seed=0, **SHAPE)
    backbone = benchsuite_backbone(state, **SHAPE)
    torch.manual_seed(1)
    coprompt, trainer = official_trainer(args.official.resolve(), state, workdir)
    model = trainer.model
    method, module, _ = plugin_setup("coprompt", backbone, CLASSNAMES, prompt_depth=DEPTH,
                                     descriptions=str(desc_file), descriptions_sha256=file_sha256(desc_file))
    with torch.no_grad():
        named = dict(module.named_parameters())
        assert set(named) == set(learnables(model)), sorted(set(named) ^ set(learnables(model)))
        for name, tensor in learnables(model).items():
            named[name].copy_(tensor)

    # the official description index: Python's random.randint, recorded; the plugin is handed the same
    draws: list[int] = []

    def randint(a, b):
        draws.append(random.randint(a, b))
        return draws[-1]

    random.seed(1)  # the official draws, reproducible: indices 0 then 2 (two different targets)
    coprompt.random = types.SimpleNamespace(randint=randint)
    method.next_description = lambda: draws[-1]
    seen = {"ce": [], "acc": []}
    coprompt.F, _ = recording_functional(seen)

    g = torch.Generator().manual_seed(2)
    image1 = torch.randn(BATCH, 3, SHAPE["image_size"], SHAPE["image_size"], generator=g)
    image2 = torch.randn(BATCH, 3, SHAPE["image_size"], SHAPE["image_size"], generator=g)
    labels = torch.tensor([0, 3, 1, 4])
    batch = TrainBatch(images=image1, labels=labels, views=[image2])

    ok = report("description targets [n, C, E]", method.descriptions, model.ori_embedding)
    with torch.no_grad():
        model.eval()
        with official_runtime(half_is_identity=True):
            official_logits = model(image1)
        with official_runtime():
            official_fp16_prompts = model(image1)
        module.eval()
        method.prepare_eval(CLASSNAMES, "caltech101", "a photo of a {}.")
        ok &= report("eval logits", method.predict(EvalBatch(labels=labels, images=image1)), official_logits)

    model.train()
    module.train()
    scores: list[torch.Tensor] = []
    with torch.no_grad(), official_runtime(half_is_identity=True), recording_cosine(scores):
        official_loss = model(image1, image2, labels)
    (train_logits, official_ce), = seen["ce"]
    text_score, image_score = scores
    with torch.no_grad():
        out = method.train_step(batch, 0)
        logits = backbone.logit_scale * method.adapted_image(image1) @ method.adapted_text().t()
    ok &= report("training logits", logits, train_logits)
    ok &= report("training loss", out["loss"], official_loss)
    ok &= report("  part ce", out["ce"], official_ce)
    ok &= report("  part consistency_text", out["consistency_text"], 1.0 - text_score.mean())
    ok &= report("  part consistency_image", out["consistency_image"], 1.0 - image_score.mean())

    with official_runtime(half_is_identity=True):
        trainer.forward_backward({"img": [image1, image2], "label": labels})
    optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad],
                               {"lr": LR, "momentum": 0.9, "weight_decay": 5e-4})
    optimizer.zero_grad(set_to_none=True)
    method.train_step(batch, 0)["loss"].backward()
    optimizer.step()
    named = dict(module.named_parameters())
    for name, tensor in learnables(model).items():
        ok &= report(f"after one SGD step: {name}", named[name], tensor)
        ok &= report("  its gradient", named[name].grad, tensor.grad)
    print(f"info: description indices drawn by the official forward: {draws}")
    print(f"info: official logits with its fp16 rounding of the prompts left in differ by rel.err "
          f"{relative_error(official_fp16_prompts, official_logits):.2e}")
    print("parity OK" if ok else "parity FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
