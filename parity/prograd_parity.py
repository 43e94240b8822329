"""ProGrad parity: the official BeierZhu/Prompt-align code beside the `prograd` plugin, same tiny weights.

    python parity/prograd_parity.py --official /work/official/Prompt-align

``--official`` is a clone of github:BeierZhu/Prompt-align (never committed). Official side:
``ProGrad.public/trainers/prograd.py`` (its ``CustomCLIP`` student, its zero-shot ``CLIP`` teacher and
``ProGradLoss``) with the repo's own ``clip`` package, and the Dassl fork's
``TrainerBase.prograd_backward_and_update`` (with the three helpers it calls) taken from
``Dassl.ProGrad.pytorch/dassl/engine/trainer.py``. The rest of Dassl (yacs, tensorboard, data
managers) is not needed and is replaced by stub modules (``parity/official_import.py``), as is
``load_clip_to_cpu`` (it would download weights). Plugin side: the installed ``benchsuite_plugins.prograd`` on
``parity/tiny_clip.py`` weights loaded through benchsuite's own loader.

Compared (fp32, relative error, tolerance 1e-5): the initial context (zeros + template words) and
the prompt embeddings with the comma quirk, student logits, teacher logits, both losses, and the
context after one SGD step (lr 0.002, momentum 0.9, weight decay 5e-4) with the projected gradient,
for a step where the two gradients agree and one where they conflict (context perturbed alike on
both sides so that each branch of the rule is exercised).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_import import cfg, load_trainer  # noqa: E402
from tiny_clip import benchsuite_backbone, make_state_dict, official_model, plugin_setup, report  # noqa: E402

CLASSNAMES = ["abyssinian", "american_bulldog", "great_pyrenees", "yorkshire_terrier", "sphynx"]
LR, MOMENTUM, WD = 0.002, 0.9, 5e-4


def official_updater(trainer_py: Path):
    """A class with the Dassl fork's TrainerBase methods used by the ProGrad update, read from its source."""
    tree = ast.parse(trainer_py.read_text())
    base = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainerBase")
    wanted = {"prograd_backward_and_update", "model_zero_grad", "get_model_names", "detect_anomaly"}
    methods = [n for n in base.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {m.name for m in methods} == wanted, "trainer.py no longer has the expected methods"
    cls = ast.ClassDef(name="Updater", bases=[], keywords=[], body=methods, decorator_list=[])
    namespace = {"torch": torch, "tolist_if_not": lambda x: x if isinstance(x, list) else [x]}
    exec(compile(ast.fix_missing_locations(ast.Module(body=[cls], type_ignores=[])), str(trainer_py), "exec"),
         namespace)
    return namespace["Updater"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="clone of BeierZhu/Prompt-align")
    args = parser.parse_args()
    root = args.official.resolve()
    official = load_trainer(root / "ProGrad.public", "trainers/prograd.py")
    build_model = official.clip.build_model  # the repo's own clip package

    from benchsuite.hookspecs import TrainBatch

    state = make_state_dict(seed=0)
    official.load_clip_to_cpu = lambda _config: build_model({k: v.clone() for k, v in state.items()})
    config = cfg(TRAINER={"COOP": {"N_CTX": 16, "CTX_INIT": True, "CSC": False, "CLASS_TOKEN_POSITION": "end",
                                   "PREC": "fp32"}},
                 DATASET={"NAME": "OxfordPets"}, INPUT={"SIZE": (64, 64)}, MODEL={"BACKBONE": {"NAME": "tiny"}})
    clip_model = official_model(build_model, state)
    student = official.CustomCLIP(config, CLASSNAMES, clip_model).eval()
    teacher = official.CLIP(config, CLASSNAMES)
    criterion = official.ProGradLoss(T=1.0)
    Updater = official_updater(root / "Dassl.ProGrad.pytorch" / "dassl" / "engine" / "trainer.py")

    backbone = benchsuite_backbone(state)
    method, learner, recipe = plugin_setup("prograd", backbone, CLASSNAMES, dataset="oxford_pets",
                                           template="a photo of a {}, a type of pet.", momentum=MOMENTUM,
                                           weight_decay=WD)
    ok = report("initial ctx (zeros + template words)", learner.ctx, student.prompt_learner.ctx)
    ok &= report("prompt embeddings (comma quirk)", learner.prompts.assemble(learner.ctx, cut=False),
                 student.prompt_learner())

    torch.manual_seed(0)
    images = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        features = backbone.encode_image(images)
    lam = float(recipe["lambda"])
    with torch.no_grad():
        zs_pred = teacher(images)
    cases = {"agreeing": zs_pred.argmax(-1), "conflicting": zs_pred.argmin(-1)}  # labels with / against the teacher
    branches = set()
    for seed, (expected, labels) in enumerate(cases.items()):
        noise = 0.05 * torch.randn(learner.ctx.shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            start = student.prompt_learner.ctx.detach().clone() + noise
            student.prompt_learner.ctx.copy_(start)
        if expected == "conflicting":  # move the student away from the teacher along the task gradient,
            ce, _ = criterion(student(images), zs_pred, labels)  # so that the teacher's gradient pulls back
            g, = torch.autograd.grad(ce, student.prompt_learner.ctx)
            start = start - g / g.norm()
        with torch.no_grad():
            student.prompt_learner.ctx.copy_(start)
            learner.ctx.copy_(start)
        # official step
        opt_o = torch.optim.SGD(student.prompt_learner.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
        out_o = student(images)
        with torch.no_grad():
            zs = teacher(images)
        xe_o, kl_o = criterion(out_o, zs.detach(), labels)
        g_ce, = torch.autograd.grad(xe_o, student.prompt_learner.ctx, retain_graph=True)
        g_kl, = torch.autograd.grad(kl_o, student.prompt_learner.ctx, retain_graph=True)
        conflict = float((g_ce * g_kl).sum()) < 0
        branches.add(conflict)
        updater = Updater()
        updater._models = {"prompt_learner": student.prompt_learner}
        updater._optims = {"prompt_learner": opt_o}
        updater.prograd_backward_and_update(xe_o, kl_o, lam)
        # plugin step, as the harness runs it
        opt_p = torch.optim.SGD([learner.ctx], lr=LR, momentum=MOMENTUM, weight_decay=WD)
        out_p = method.train_step(TrainBatch(images, labels, features), 0)
        opt_p.zero_grad(set_to_none=True)
        method.backward(outputs=out_p, model=learner, scaler=None)
        opt_p.step()
        with torch.no_grad():
            z = torch.nn.functional.normalize(features, dim=-1)
            student_p = backbone.logit_scale * z @ torch.nn.functional.normalize(
                learner.prompts.encode(start), dim=-1).t()
            teacher_p = backbone.logit_scale * z @ method.teacher.t()
        tag = "conflicting" if conflict else "agreeing"
        print(f"-- labels {expected} with the teacher: {tag} gradients (cos(g_ce, g_kl) "
              f"{float((g_ce * g_kl).sum() / (g_ce.norm() * g_kl.norm())):+.3f})")
        ok &= report("student logits", student_p, out_o)
        ok &= report("teacher (zero-shot) logits", teacher_p, zs)
        ok &= report("cross-entropy loss", out_p["loss"], xe_o)
        ok &= report("KL (soft-target CE) loss", out_p["kl_loss"], kl_o)
        ok &= report("ctx after one SGD step", learner.ctx, student.prompt_learner.ctx)
    if len(branches) < 2:
        print("BAD the two cases did not exercise both branches of the rule")
        ok = False
    print("parity OK" if ok else "parity FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
