"""Parity of the `mma` plugin with ZjjConan/Multi-Modal-Adapter, on tiny OpenAI-shaped weights.

Usage (the official repository is obtained separately and never committed)::

    python parity/mma_parity.py --official /tmp/official/Multi-Modal-Adapter

Both sides get the same fp32 weights (`tiny_clip.make_state_dict`: 4 blocks per tower, text width 128,
vision width 192, so the two towers' adapters differ in shape), class names and images. The official
builder indexes adapters by absolute block number and fails on a tower shallower than ``ADAPTER_END``
(12 in the configs), so both sides use layers 2..4 of the 4 blocks (block 1 unadapted, the official
rule on both sides), dimension 32, and two scales: the configs' 0.001 and ``extend_cfg``'s default
0.1 (at 0.001 the adapters move the logits only slightly at the start, so the gradients carry
most of the check there; the script prints how far the adapters move the logits from the frozen
CLIP's). The trainer module is loaded once per scale (``load_trainer`` re-executes the file).

Compared, each within 1e-5 relative:
- the initial adapters drawn by each side from the same seed (creation order and Kaiming re-init);
- evaluation logits (the official ``text_features_for_inference`` path) before and after the step,
  and training-mode logits;
- the training loss (cross-entropy, the only term), driven by the official trainer's own
  ``forward_backward`` with ``PREC`` "fp32" (Dassl's ``model_backward_and_update``: zero_grad,
  backward, step), the plugin through its ``train_step`` and the harness's optimizer;
- the gradient of every learned tensor (text, vision and shared adapters; the official gradient
  scaling makes these 1000x the plain autograd gradients, on both sides), and every learned tensor
  after that first SGD step (lr 0.0015, momentum 0.9, weight decay 5e-4).

Not compared: the ``amp`` path the configs use (``torch.cuda.amp.autocast`` + GradScaler) needs CUDA;
on CPU both sides would run bf16 autocast, which is not the official arithmetic. The official amp
model is fp32 with fp32 adapters, as the plugin's masters, so the fp32 comparison covers the model.

What it takes to run the official code here (methods.md 7.12; ``parity/official_import.py``):
``dassl`` is stubbed (only the model classes and ``forward_backward`` run; Dassl's
``model_backward_and_update`` is supplied as zero_grad, backward, step), ``.cuda()`` is a no-op.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_import import bare_trainer, cfg, load_trainer, official_runtime, recording_functional  # noqa: E402
from tiny_clip import benchsuite_backbone, make_state_dict, plugin_setup, relative_error, report  # noqa: E402

SHAPE = dict(layers=4, text_width=128, vision_width=192, embed_dim=64, image_size=64, patch_size=16)
CLASSNAMES = ["golden_retriever", "cat", "sea lion", "airplane_cabin", "1993 Geo Metro Convertible"]
START, END, DIM, LR, BATCH = 2, 4, 32, 0.0015, 4
#: the configs' scale, and ``extend_cfg``'s default, under which the adapters move the logits visibly
SCALES = (0.001, 0.1)


def official_trainer(repo: Path, state: dict[str, torch.Tensor], seed: int, scale: float):
    """The official MMA CustomCLIP on ``state``, frozen by the trainer's rule, in a bare trainer."""
    mma = load_trainer(repo, "trainers/mmadapter.py")
    config = cfg(TRAINER={"MMADAPTER": {"TEXT_CTX_INIT": "a photo of a", "PREC": "fp32", "ADAPTER_START": START,
                                        "ADAPTER_END": END, "ADAPTER_DIM": DIM, "ADAPTER_SCALE": scale}},
                 INPUT={"SIZE": (SHAPE["image_size"],) * 2},
                 MODEL={"BACKBONE": {"NAME": "ViT-B/16"}, "INIT_WEIGHTS": ""})
    with official_runtime():
        clip_model = mma.clip.build_model({k: v.clone() for k, v in state.items()}).float().eval()
        torch.manual_seed(seed)
        model = mma.CustomCLIP(config, CLASSNAMES, clip_model)
    for name, param in model.named_parameters():  # the trainer's rule
        param.requires_grad_("text_adapter" in name or "visual_adapter" in name or "shared_adapter" in name)
    trainer = bare_trainer(mma.MultiModalAdapter, model, config, LR)

    def model_backward_and_update(loss):  # Dassl's SimpleTrainer: zero_grad, backward, step
        trainer.optim.zero_grad()
        loss.backward()
        trainer.optim.step()

    trainer.model_backward_and_update = model_backward_and_update
    return mma, trainer


def learnables(model) -> dict[str, torch.Tensor]:
    """The official learnable tensors under the plugin's parameter names (the same names)."""
    prefix = "adapter_learner."
    return {name[len(prefix):]: p for name, p in model.named_parameters() if p.requires_grad}


def run(repo: Path, scale: float) -> bool:
    """One comparison at adapter scale ``scale``; True when every figure is within tolerance."""
    print(f"--- ADAPTER_SCALE {scale}")
    state = make_state_dict(seed=0, **SHAPE)
    backbone = benchsuite_backbone(state, **SHAPE)
    mma, trainer = official_trainer(repo, state, seed=1, scale=scale)
    model = trainer.model
    torch.manual_seed(1)
    method, module, _ = plugin_setup("mma", backbone, CLASSNAMES, adapter_start=START, adapter_end=END,
                                     adapter_dim=DIM, adapter_scale=scale)
    ok = True
    named = dict(module.named_parameters())
    official = learnables(model)
    if set(named) != set(official):
        print(f"BAD parameter names differ: plugin only {sorted(set(named) - set(official))}, "
              f"official only {sorted(set(official) - set(named))}")
        return False
    print(f"info: {len(named)} learned tensors, {sum(p.numel() for p in named.values())} values on each side")
    for name, tensor in official.items():
        ok &= report(f"initial (same seed): {name}", named[name], tensor)
    with torch.no_grad():  # identical starting point whatever the draws
        for name, tensor in official.items():
            named[name].copy_(tensor)

    from benchsuite.hookspecs import EvalBatch, TrainBatch

    g = torch.Generator().manual_seed(2)
    images = torch.randn(BATCH, 3, SHAPE["image_size"], SHAPE["image_size"], generator=g)
    labels = torch.tensor([0, 3, 1, 4])

    def evaluate(what: str) -> bool:
        with torch.no_grad():
            model.eval()
            model.text_features_for_inference = None
            with official_runtime():
                official_eval = model(images)
            model.text_features_for_inference = None
            module.eval()
            method.prepare_eval(CLASSNAMES, "caltech101", "a photo of a {}.")
            plugin_eval = method.predict(EvalBatch(labels=labels, images=images))
            frozen = backbone.logit_scale * torch.nn.functional.normalize(backbone.encode_image(images), dim=-1) @ \
                torch.nn.functional.normalize(backbone.encode_text([f"a photo of a {c.replace('_', ' ')}."
                                                                    for c in CLASSNAMES]), dim=-1).t()
        print(f"info: {what}: the adapters move the logits by rel. {relative_error(official_eval, frozen):.2e} "
              f"from the frozen CLIP's")
        return report(f"eval logits {what}", plugin_eval, official_eval)

    ok &= evaluate("at the start")
    model.train()
    module.train()
    seen: dict = {"ce": [], "acc": []}
    mma.F, _ = recording_functional(seen)
    with official_runtime():
        trainer.forward_backward({"img": images, "label": labels})
    (official_logits, official_loss), = seen["ce"]

    from benchsuite.engine.train import make_optimizer

    optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad],
                               {"lr": LR, "momentum": 0.9, "weight_decay": 5e-4})
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        plugin_logits = method.logits(images, method.class_text_features())
    ok &= report("training logits", plugin_logits, official_logits)
    loss = method.train_step(TrainBatch(images=images, labels=labels), 0)["loss"]
    ok &= report("training loss (CE, the only part)", loss, official_loss)
    loss.backward()
    optimizer.step()
    for name, tensor in official.items():
        ok &= report(f"gradient: {name}", named[name].grad, tensor.grad)
        ok &= report(f"  after one SGD step", named[name], tensor)
    ok &= evaluate("after the step")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="clone of ZjjConan/Multi-Modal-Adapter")
    args = parser.parse_args(argv)
    ok = True
    for scale in SCALES:
        ok &= run(args.official.resolve(), scale)
    print("parity OK" if ok else "parity FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
