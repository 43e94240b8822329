"""Parity of the `promptkd` plugin with zhengli97/PromptKD ``trainers/promptkd.py``, on tiny OpenAI-shaped weights.

Usage (the official repository is obtained separately and never committed)::

    python parity/promptkd_parity.py --official /tmp/official/PromptKD

Both sides get the same fp32 weights (`tiny_clip.make_state_dict`, student and teacher on the same
backbone, as the plugin runs), the same class names (base and new halves, ``TRAINER.MODAL
base2novel``), images and initial tensors. The teacher is the plugin's PromptSRC module with its
prompt sets moved off their initialisation (a stand-in for a trained teacher), copied into the
official ``CustomCLIP_teacher``; the official student's vision prompts and projector are copied into
the plugin. Compared, each within 1e-5 relative: the teacher's text features of all classes and its
logits; the student's training logits; the loss (and its KL part, loss / KD_WEIGHT); the gradient
of every learned tensor; every learned tensor and the BatchNorm running statistics after one SGD
step (lr 0.005, momentum 0.9, weight decay 5e-4) driven by the official trainer's own
``forward_backward``; evaluation logits over all classes (the ``cross`` branch of the official
``test``) before and after the step. One exception: the bias of the projector's first convolution
feeds BatchNorm, so its true gradient is zero and both sides hold round-off; its gradient is
compared relative to the scale of that convolution's weight gradient and its update relative to the
size of that weight's update, not relative to itself.

What it takes to run the official code here (methods.md 7.12; ``parity/official_import.py``):
``dassl`` is stubbed, ``.cuda()`` is a no-op, and the official loaders read ``./clip/ViT-B-16.pt``
and ``./clip/ViT-L-14.pt`` relative to the working directory, so the script runs in a temporary
folder holding the tiny state dict under both names. The IVLP forward casts prompts with ``.half()``
even in fp32 mode, so ``.half()`` is the identity while official code runs (both sides fp32). The
official teacher CLIP is never cast to fp32 by the trainer (only the student's is, under fp32/amp):
it is cast here. The official projector is hard-coded ``Feature_Trans_Module_two_layer(512, 768)``
(ViT-B/16 features to ViT-L/14's width) and converted to fp16 by ``convert_weights`` even under
fp32 (where its fp32 path then fails on an fp16 weight): the script replaces it with the same
official class at the tiny widths (64 -> 64), left in fp32.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_import import bare_trainer, cfg, load_trainer, official_runtime  # noqa: E402
from tiny_clip import benchsuite_backbone, make_state_dict, report  # noqa: E402

SHAPE = dict(layers=4, text_width=128, vision_width=128, embed_dim=64, image_size=64, patch_size=16)
CLASSNAMES = ["golden_retriever", "cat", "sea lion", "airplane_cabin", "1993 Geo Metro Convertible"]
BASE = CLASSNAMES[:math.ceil(len(CLASSNAMES) / 2)]
DEPTH = 3  # student vision depth < 4 blocks: later blocks are exercised too
LR, BATCH, KD_WEIGHT, T = 0.005, 4, 1000.0, 1.0


def official_cfg():
    node = {"N_CTX_VISION": 4, "N_CTX_TEXT": 4, "CTX_INIT": "a photo of a", "PREC": "fp32",
            "PROMPT_DEPTH_VISION": DEPTH, "PROMPT_DEPTH_TEXT": DEPTH, "TEACHER_NAME": "ViT-L/14",
            "KD_WEIGHT": KD_WEIGHT, "TEMPERATURE": T, "CE_WEIGHT": 0.0}
    return cfg(MODEL={"BACKBONE": {"NAME": "ViT-B/16"}, "INIT_WEIGHTS": ""}, INPUT={"SIZE": (SHAPE["image_size"],) * 2},
               OPTIM={"MAX_EPOCH": 20}, TRAINER={"PROMPTKD": node, "NAME": "PromptKD", "MODAL": "base2novel"})


def official_models(module, config):
    """(student CustomCLIP, teacher CustomCLIP_teacher), frozen as the trainer's build_model freezes them."""
    with official_runtime(half_is_identity=True):
        clip_model = module.load_clip_to_cpu(config)
        clip_model.float()  # the trainer's fp32 branch
        student = module.CustomCLIP(config, CLASSNAMES, clip_model)
        student.VPT_image_trans = module.Feature_Trans_Module_two_layer(SHAPE["embed_dim"], SHAPE["embed_dim"])
        teacher_clip = module.load_clip_to_cpu_teacher(config).float()
        teacher = module.CustomCLIP_teacher(config, CLASSNAMES, teacher_clip)
    teacher.eval()
    teacher.requires_grad_(False)
    for name, param in student.named_parameters():  # the trainer's rule
        param.requires_grad_("VPT" in name)
    return student, teacher


def teacher_sets(teacher):
    text = [teacher.prompt_learner.ctx] + [teacher.text_encoder.transformer.resblocks[i].VPT_shallow
                                           for i in range(1, len(teacher.text_encoder.transformer.resblocks))
                                           if hasattr(teacher.text_encoder.transformer.resblocks[i], "VPT_shallow")]
    vision = [teacher.image_encoder.VPT] + [teacher.image_encoder.transformer.resblocks[i].VPT_shallow
                                            for i in range(1, len(teacher.image_encoder.transformer.resblocks))
                                            if hasattr(teacher.image_encoder.transformer.resblocks[i], "VPT_shallow")]
    return text, vision


def student_tensors(student):
    """(name, official tensor, how to read the plugin's tensor) of every learned student tensor."""
    visual = student.image_encoder
    prompts = [("vision prompt set 0", visual.VPT, lambda m: m.vision.sets[0])]
    for i in range(1, DEPTH):
        prompts.append((f"vision prompt set {i}", visual.transformer.resblocks[i].VPT_shallow,
                        lambda m, i=i: m.vision.sets[i]))
    conv = student.VPT_image_trans.conv1
    proj = [("projector conv1 weight", conv[0].weight, lambda m: m.projector.net[0].weight),
            ("projector conv1 bias", conv[0].bias, lambda m: m.projector.net[0].bias),
            ("projector bn weight", conv[1].weight, lambda m: m.projector.net[1].weight),
            ("projector bn bias", conv[1].bias, lambda m: m.projector.net[1].bias),
            ("projector conv2 weight", conv[3].weight, lambda m: m.projector.net[3].weight),
            ("projector conv2 bias", conv[3].bias, lambda m: m.projector.net[3].bias)]
    return prompts + proj


def scaled(name: str, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, tol: float = 1e-5) -> bool:
    """max |a - b| / scale, for a quantity whose own size is round-off."""
    err = float((a.detach().double() - b.detach().double()).abs().max() / float(scale))
    print(f"{'OK ' if err <= tol else 'BAD'} {name:<40} err/scale {err:.2e} (tol {tol:.0e})")
    return err <= tol


class Resolver:
    """SetupContext.dependencies outside a runner: hands out the given teacher."""

    def __init__(self, dependency):
        self.dependency = dependency

    def trained(self, method):
        return self.dependency


def plugin_side(backbone):
    from benchsuite.engine.recipe import HARNESS_DEFAULTS
    from benchsuite.hookspecs import SetupContext, TrainedDependency
    from benchsuite.methods import get_method, job_manager
    from benchsuite.protocols import load_protocol
    from tiny_clip import plugin_setup

    teacher, teacher_module, _ = plugin_setup("promptsrc", backbone, BASE, prompt_depth_text=9, prompt_depth_vision=9)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a "trained" teacher: prompts moved off their initialisation
        for p in teacher_module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    teacher_module.eval().requires_grad_(False)
    dependency = TrainedDependency(method=teacher, module=teacher_module, job_id="0" * 64, sha256="0" * 64,
                                   trained=False)
    pm, method = job_manager(get_method("promptkd"))
    protocol = load_protocol("base2new")
    recipe = {**HARNESS_DEFAULTS, **pm.hook.recipe(protocol=protocol, dataset="caltech101", shots=16),
              "prompt_depth_vision": DEPTH, "lr": LR, "kd_weight": KD_WEIGHT, "temperature": T}
    ctx = SetupContext(backbone=backbone, classnames=BASE, dataset="caltech101", template="a photo of a {}.",
                       recipe=recipe, protocol=protocol, shots=16, seed=1, device=torch.device("cpu"),
                       all_classnames=CLASSNAMES, dependencies=Resolver(dependency))
    module = method.setup(ctx)
    return method, module, recipe, teacher_module


def copy_teacher(teacher_module, official_teacher) -> None:
    text, vision = teacher_sets(official_teacher)
    assert len(text) == teacher_module.text.depth and len(vision) == teacher_module.vision.depth, \
        (len(text), teacher_module.text.depth, len(vision), teacher_module.vision.depth)
    with torch.no_grad():
        for o, p in zip(text + vision, list(teacher_module.text.sets) + list(teacher_module.vision.sets)):
            o.copy_(p)


def eval_logits_plugin(method, images):
    from benchsuite.hookspecs import EvalBatch

    method.student.eval()
    with torch.no_grad():
        method.prepare_eval(CLASSNAMES, "caltech101", "a photo of a {}.")
        return method.predict(EvalBatch(labels=torch.zeros(len(images), dtype=torch.long), images=images))


def eval_logits_official(student, teacher, images):
    student.eval()
    with torch.no_grad(), official_runtime(half_is_identity=True):
        _, text, _ = teacher(images)
        features, scale = student(images)
        return scale * features @ text.t()  # the ``cross`` branch of PromptKD.test


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="a clone of zhengli97/PromptKD")
    args = parser.parse_args(argv)
    official_root = args.official.resolve()
    state = make_state_dict(seed=0, **SHAPE)
    module = load_trainer(official_root, "trainers/promptkd.py")
    work = Path(tempfile.mkdtemp(prefix="bs-parity-promptkd-"))
    (work / "clip").mkdir()
    for name in ("ViT-B-16.pt", "ViT-L-14.pt"):
        torch.save(state, work / "clip" / name)
    backbone = benchsuite_backbone(state, **SHAPE)
    torch.manual_seed(0)
    config = official_cfg()
    cwd = os.getcwd()
    os.chdir(work)  # the official loaders read ./clip/<name>.pt
    try:
        student, teacher = official_models(module, config)
    finally:
        os.chdir(cwd)
    method, plugin_module, recipe, teacher_module = plugin_side(backbone)
    copy_teacher(teacher_module, teacher)
    tensors = student_tensors(student)
    with torch.no_grad():
        for _, o, get in tensors:
            get(plugin_module).copy_(o.view_as(get(plugin_module)))
    print(f"== promptkd (student vision depth {DEPTH}, 4 tokens; PromptSRC teacher depth 9/9 on the same tiny "
          f"backbone; {len(CLASSNAMES)} classes, base {len(BASE)}; batch {BATCH}; KD_WEIGHT {KD_WEIGHT:g}, T {T:g})")
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, SHAPE["image_size"], SHAPE["image_size"], generator=gen)
    labels = torch.tensor([0, 3, 1, 4])  # never read by either side (CE_WEIGHT 0)

    with torch.no_grad(), official_runtime(half_is_identity=True):
        _, official_text, official_teacher_logits = teacher(images)
    ok = report("teacher text features, all classes", method.teacher_text, official_text)
    ok &= report("teacher logits", method.teacher_logits(images), official_teacher_logits)
    ok &= report("eval logits at init", eval_logits_plugin(method, images),
                 eval_logits_official(student, teacher, images))

    probe = copy.deepcopy(student).train()  # training-mode logits without touching the real BN statistics
    with official_runtime(half_is_identity=True):
        features, scale = probe(images)
        official_student_logits = scale * features @ official_text.t()
    plugin_module.train()
    probe_plugin = copy.deepcopy(plugin_module)
    with torch.no_grad():
        plugin_student_logits = method.logits(probe_plugin.image_features(images), method.teacher_text)
    ok &= report("student training logits", plugin_student_logits, official_student_logits)

    from benchsuite.engine.train import make_optimizer
    from benchsuite.hookspecs import TrainBatch

    optimizer = make_optimizer([p for p in plugin_module.parameters() if p.requires_grad], recipe)
    out = method.train_step(TrainBatch(images, labels), 0)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    grads = {name: get(plugin_module).grad.detach().clone() for name, _, get in tensors}
    optimizer.step()

    trainer = bare_trainer(module.PromptKD, student, config, LR)
    trainer.model_teacher, trainer.temperature = teacher, T
    student.train()
    with official_runtime(half_is_identity=True):
        official_loss = trainer.forward_backward({"img": images, "label": labels})["loss"]
    ok &= report("training loss (first step)", out["loss"].detach(), torch.tensor(official_loss))
    ok &= report("kd part (loss / KD_WEIGHT)", out["kd"].detach(), torch.tensor(official_loss / KD_WEIGHT))
    # conv1's bias feeds BatchNorm, which subtracts the batch mean: its true gradient is exactly zero, and
    # both sides hold round-off (about 1e-6 of conv1's weight gradient), so a relative error is meaningless
    # there. It is compared relative to the scale of conv1's weight gradient (and its step relative to
    # the size of conv1's weight update) instead.
    weight_grad = dict((name, o) for name, o, _ in tensors)["projector conv1 weight"].grad.abs().max()
    for name, o, get in tensors:
        if name == "projector conv1 bias":
            ok &= scaled(f"gradient: {name} (zero in exact arithmetic)", grads[name], o.grad, weight_grad)
        else:
            ok &= report(f"gradient: {name}", grads[name].view_as(o), o.grad)
    for name, o, get in tensors:
        if name == "projector conv1 bias":
            ok &= scaled(f"after one SGD step: {name}", get(plugin_module), o, LR * weight_grad)
        else:
            ok &= report(f"after one SGD step: {name}", get(plugin_module).view_as(o), o)
    bn_plugin, bn_official = plugin_module.projector.net[1], student.VPT_image_trans.conv1[1]
    ok &= report("BN running mean after the step", bn_plugin.running_mean, bn_official.running_mean)
    ok &= report("BN running var after the step", bn_plugin.running_var, bn_official.running_var)
    ok &= report("eval logits after the step", eval_logits_plugin(method, images),
                 eval_logits_official(student, teacher, images))
    n_official = sum(p.numel() for p in student.parameters() if p.requires_grad)
    n_plugin = sum(p.numel() for p in plugin_module.parameters() if p.requires_grad)
    print(f"{'OK ' if n_official == n_plugin else 'BAD'} learned tensors: plugin {n_plugin} values, official "
          f"{n_official}")
    ok &= n_official == n_plugin
    print("PARITY OK" if ok else "PARITY FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
