"""PromptKD: the student, its distillation loss, the teacher as a job dependency, unlabeled training data."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch
import torch.nn.functional as F

from benchsuite.clip.templates import PROMPTSRC_TEMPLATES
from benchsuite.data.datum import DatasetSplits, Datum
from benchsuite.data.fewshot import FewShotSplit
from benchsuite.engine.dependencies import UNLABELED, training_items
from benchsuite.engine.recipe import HARNESS_DEFAULTS
from benchsuite.errors import BenchsuiteError
from benchsuite.hookspecs import EvalBatch, SetupContext, TrainBatch, TrainedDependency, method_setting
from benchsuite.methods import get_method, job_manager
from benchsuite.protocols import load_protocol
from benchsuite_plugins.promptkd import PromptKD, StudentPrompts
from benchsuite_plugins.promptsrc import PromptSRC
from test_run import load_results, run_args, run_quiet

ALL = ["cat", "dog", "sea lion", "golden_retriever", "airplane cabin"]
BASE = ALL[:3]


def recipe(protocol: str, dataset: str = "caltech101", shots: int = 16) -> dict:
    pm, _ = job_manager(get_method("promptkd"))
    return pm.hook.recipe(protocol=load_protocol(protocol), dataset=dataset, shots=shots)


class Resolver:
    def __init__(self, dependency):
        self.dependency, self.asked = dependency, []

    def trained(self, method):
        self.asked.append(method)
        return self.dependency


@pytest.fixture
def few_templates(monkeypatch):
    import benchsuite_plugins.promptsrc as plugin

    full = plugin.template_anchors
    monkeypatch.setattr(plugin, "template_anchors", lambda b, c: full(b, c, PROMPTSRC_TEMPLATES[:2]))


def teacher_for(backbone):
    """A PromptSRC teacher on the base classes, its prompts moved off their initialisation."""
    teacher = PromptSRC()
    r = {**HARNESS_DEFAULTS, **teacher.recipe(load_protocol("base2new"), "caltech101", 16)}
    module = teacher.setup(SetupContext(backbone=backbone, classnames=BASE, dataset="caltech101",
                                        template="a photo of a {}.", recipe=r, protocol=load_protocol("base2new"),
                                        shots=16, seed=1, device=torch.device("cpu")))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    module.eval().requires_grad_(False)
    return teacher, module


def setup_student(backbone, **overrides):
    teacher, module = teacher_for(backbone)
    resolver = Resolver(TrainedDependency(teacher, module, "a" * 64, "b" * 64, False))
    method = PromptKD()
    r = {**HARNESS_DEFAULTS, **recipe("base2new"), **overrides}
    student = method.setup(SetupContext(backbone=backbone, classnames=BASE, dataset="caltech101",
                                        template="a photo of a {}.", recipe=r, protocol=load_protocol("base2new"),
                                        shots=16, seed=1, device=torch.device("cpu"), all_classnames=ALL,
                                        dependencies=resolver))
    return method, student, teacher, resolver


def test_parameter_count_on_vit_b16_shapes():
    from benchsuite.clip.backbone import load_backbone

    backbone = load_backbone("ViT-B-16", "none", precision="fp32", device="cpu")
    prompts = 9 * 4 * 768
    same = StudentPrompts(backbone, n_ctx_vision=4, depth_vision=9, teacher_dim=512)
    assert sum(p.numel() for p in same.parameters() if p.requires_grad) == prompts + 2 * 512 * 512 + 4 * 512 == 553_984
    large = StudentPrompts(backbone, n_ctx_vision=4, depth_vision=9, teacher_dim=768)  # published ViT-L/14 teacher
    assert sum(p.numel() for p in large.parameters()) == prompts + 512 * 768 + 768 * 768 + 4 * 768 == 1_013_760


def test_declarations_and_recipes_per_protocol():
    assert (PromptKD.setting, PromptKD.train_data, PromptKD.transductive) == ("teacher-distilled", "unlabeled_all", True)
    assert method_setting(PromptKD) == "teacher-distilled" and PromptKD.min_batch_size == 2
    b2n, xd, dtd = recipe("base2new"), recipe("cross_dataset", "imagenet"), recipe("base2new", "dtd")
    assert (b2n["epochs"], b2n["batch_size"], b2n["lr"], b2n["prompt_depth_vision"], b2n["n_ctx_vision"]) == \
        (20, 8, 0.005, 9, 4)
    assert (b2n["kd_weight"], b2n["temperature"], b2n["teacher"]) == (1000.0, 1.0, "promptsrc")
    assert dtd["kd_weight"] == recipe("base2new", "fgvc_aircraft")["kd_weight"] == 200.0
    assert (xd["prompt_depth_vision"], xd["kd_weight"]) == (3, 1000.0)
    assert recipe("domain_generalization", "imagenet") == xd
    assert recipe("few_shot", "dtd", 4)["prompt_depth_vision"] == 9


def test_teacher_text_features_of_all_classes_are_stored_once(tiny_backbone, few_templates):
    method, student, teacher, resolver = setup_student(tiny_backbone)
    assert resolver.asked == ["promptsrc"]
    assert method.teacher_text.shape == (len(ALL), tiny_backbone.embed_dim)
    teacher.learner.set_classnames(ALL)
    with torch.no_grad():
        expected = F.normalize(teacher.learner.text_features().float(), dim=-1)
    torch.testing.assert_close(method.teacher_text, expected)
    # the teacher stays out of the student's state: nothing of it is trained or saved
    assert all(not k.startswith("teacher") for k in student.state_dict())
    assert sum(p.numel() for p in student.parameters()) == (
        sum(s.numel() for s in student.vision.sets) + sum(p.numel() for p in student.projector.parameters()))


def test_kd_loss_against_an_independent_computation(tiny_backbone, few_templates):
    method, student, teacher, _ = setup_student(tiny_backbone, kd_weight=7.0, temperature=2.0)
    student.train()
    images = torch.randn(4, 3, tiny_backbone.image_size, tiny_backbone.image_size, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    out = method.train_step(TrainBatch(images, torch.full((4,), UNLABELED)), 0)
    scale = tiny_backbone.logit_scale
    teacher.learner.set_classnames(ALL)
    with torch.no_grad():
        text = F.normalize(teacher.learner.text_features().float(), dim=-1)
        t_logits = scale * F.normalize(teacher.learner.image_features(images).float(), dim=-1) @ text.t()
        raw = tiny_backbone.encode_image(images, prompts=student.vision.input, deep_prompts=student.vision.deep())
        s_logits = scale * F.normalize(student.projector(raw).float(), dim=-1) @ text.t()
    p_t, T = torch.softmax(t_logits / 2.0, dim=1), 2.0
    kd = (p_t * (p_t.log() - torch.log_softmax(s_logits / T, dim=1))).sum() / s_logits.numel() * T * T
    torch.testing.assert_close(out["kd"], kd, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["loss"], 7.0 * kd, rtol=1e-5, atol=1e-6)
    assert out["loss"].dtype == torch.float32 and out["loss"].requires_grad
    out["loss"].backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.learner.parameters())


def test_predict_uses_the_teacher_text_of_the_evaluated_classes(tiny_backbone, few_templates):
    method, student, teacher, _ = setup_student(tiny_backbone)
    student.eval()
    images = torch.randn(3, 3, tiny_backbone.image_size, tiny_backbone.image_size)
    new = ALL[3:]
    with torch.no_grad():
        method.prepare_eval(new, "caltech101", "a photo of a {}.")
        logits = method.predict(EvalBatch(labels=torch.zeros(3, dtype=torch.long), images=images))
        expected = tiny_backbone.logit_scale * student.image_features(images) @ method.teacher_text[3:].t()
    assert logits.shape == (3, 2)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_setup_outside_a_job_says_it_needs_one(tiny_backbone):
    ctx = SetupContext(backbone=tiny_backbone, classnames=BASE, dataset="caltech101", template="a photo of a {}.",
                       recipe={**HARNESS_DEFAULTS, **recipe("base2new")}, protocol=load_protocol("base2new"), shots=16,
                       seed=1, device=torch.device("cpu"))
    with pytest.raises(BenchsuiteError, match="outside a benchsuite job"):
        PromptKD().setup(ctx)


def test_unlabeled_training_items_are_every_train_image_without_labels():
    train = [Datum(f"/d/{c}/{i}.jpg", y, c) for y, c in enumerate(ALL) for i in range(3)]
    splits = DatasetSplits("toy", "/d", train, [], [], classnames=list(ALL))
    fewshot = FewShotSplit("toy", "/d", 1, 1, train[:3], [], [], BASE)
    split, names = training_items(PromptKD, splits, fewshot)
    assert [d.impath for d in split.train] == [d.impath for d in train] and names == ALL
    assert {d.label for d in split.train} == {UNLABELED} and {d.classname for d in split.train} == {""}
    assert training_items(PromptSRC, splits, fewshot) == (fewshot, None)


def test_base2new_job_trains_its_teacher_as_a_dependency(tmp_path, tiny_checkpoint, data_root):
    """The teacher is the promptsrc job's own training (same job id), stored and hashed; a rerun that
    finds it stored loads it and gives the student exactly the same numbers (random streams untouched)."""
    first, second = tmp_path / "first", tmp_path / "second"
    args = ("--method", "promptkd", "--dataset", "dtd", "--seeds", "1", "--set", "epochs=2", "--quiet")
    code, out, err = run_quiet(run_args("base2new", tiny_checkpoint, data_root, first, *args))
    assert code == 0, out + err
    (result,) = load_results(first).values()
    (dep,) = result["method"]["dependencies"]
    assert dep["method"] == "promptsrc" and dep["trained"] is True
    stored = first / "_trained" / f"dependency-{dep['job_id']}.pt"
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == dep["sha256"]
    unlabeled, train = result["data"]["unlabeled"], result["data"]["train"]
    assert unlabeled["n_classes"] == 2 * train["n_classes"] and unlabeled["n_images"] > train["n_images"]
    assert result["method"]["setting"] == "teacher-distilled"

    (second / "_trained").mkdir(parents=True)
    shutil.copy(stored, second / "_trained" / stored.name)
    code, out, err = run_quiet(run_args("base2new", tiny_checkpoint, data_root, second, *args))
    assert code == 0, out + err
    (again,) = load_results(second).values()
    (loaded,) = again["method"]["dependencies"]
    assert (loaded["job_id"], loaded["sha256"], loaded["trained"]) == (dep["job_id"], dep["sha256"], False)
    assert again["metrics"]["base"]["accuracy"] == result["metrics"]["base"]["accuracy"]
    assert again["metrics"]["new"]["accuracy"] == result["metrics"]["new"]["accuracy"]
    assert again["training"]["loss_per_epoch"] == result["training"]["loss_per_epoch"]

    # the dependency is promptsrc's own job: its result is filed under the same job id
    code, out, err = run_quiet(run_args("base2new", tiny_checkpoint, data_root, first, "--method", "promptsrc",
                                        *args[2:]))
    assert code == 0, out + err
    assert load_results(first)[("promptsrc", "dtd", 16, 1)]["job"]["id"] == dep["job_id"]
