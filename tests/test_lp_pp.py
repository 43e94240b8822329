"""LP++ (FereshteShakeri/FewShot-CLIP-Strong-Baseline `methods/linear_probe_p2.py`): data-informed
initialisation and step sizes, the full-batch solver with its accumulated alpha gradient, the
seen/unseen fallback, and runs through the harness (training-free: the solver runs in fit_features)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from benchsuite.engine.recipe import HARNESS_DEFAULTS
from benchsuite.hookspecs import EvalBatch, LabelSpace, SetupContext
from benchsuite.protocols import load_protocol
from benchsuite.results.validate import validate_result
from benchsuite_plugins.lp_plus_plus import (IMAGENET_TEMPLATES, LinearProbePP, LPPlusPlus, initial_alpha, solve,
                                             step_size_alpha, step_size_w, text_classifier)
from benchsuite_plugins.zeroshot_clip import ZeroshotCLIP
from test_run import load_results, run_args, run_quiet

CLASSNAMES = ["golden_retriever", "cat", "sea lion", "airplane_cabin"]
PHOTO = "a photo of a {}."
SHOTS = 4


def recipe(protocol: str = "few_shot", dataset: str = "caltech101", shots: int = 16) -> dict:
    return {**HARNESS_DEFAULTS, **LPPlusPlus().recipe(load_protocol(protocol), dataset, shots)}


def setup_lp(backbone, classnames=CLASSNAMES, dataset="caltech101", template=PHOTO, **overrides):
    method = LPPlusPlus()
    ctx = SetupContext(backbone=backbone, classnames=list(classnames), dataset=dataset, template=template,
                       recipe={**recipe(), **overrides}, protocol=load_protocol("few_shot"), shots=SHOTS, seed=1,
                       device=torch.device("cpu"))
    return method, method.setup(ctx)


def train_set(backbone, n_classes: int = len(CLASSNAMES), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    size = backbone.image_size
    with torch.no_grad():
        feats = backbone.encode_image(torch.randn(n_classes * SHOTS, 3, size, size, generator=gen))
    return feats, torch.arange(n_classes).repeat_interleave(SHOTS)


@pytest.mark.parametrize("protocol,dataset,shots", [("few_shot", "caltech101", 1), ("few_shot", "imagenet", 16),
                                                    ("base2new", "dtd", 16), ("cross_dataset", "imagenet", 16)])
def test_recipe_is_training_free_with_the_official_solver_settings(protocol, dataset, shots):
    r = recipe(protocol, dataset, shots)
    assert r["epochs"] == 0
    assert (r["solver_steps"], r["alpha_every"], r["alpha_init_scale"]) == (300, 10, 250.0)
    assert LPPlusPlus.fit_views == 1 and LPPlusPlus.image_input == "features"


def test_step_sizes_are_the_data_informed_ones():
    torch.manual_seed(0)
    f = F.normalize(torch.randn(40, 16), dim=-1)
    t = F.normalize(torch.randn(5, 16), dim=-1)
    sigma = torch.linalg.matrix_norm(f.double(), ord=2)
    assert step_size_w(f) == pytest.approx(float(4 * 40 / sigma ** 2), rel=1e-9)
    text_logits = f @ t.t()
    assert step_size_alpha(text_logits) == pytest.approx(40 / (4 * float(text_logits.pow(2).sum(0).max())), rel=1e-6)


def test_initial_alpha_is_250_times_the_mean_own_class_cosine():
    torch.manual_seed(0)
    text_logits = torch.rand(12, 3)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    own = torch.stack([text_logits[labels == c, c].mean() for c in range(3)])
    assert float(initial_alpha(text_logits, labels, 3, 250.0)) == pytest.approx(250 * float(own.mean()), rel=1e-6)


def test_initialisation_class_sums_default_bias_and_shared_alpha(tiny_backbone):
    torch.manual_seed(3)
    method, module = setup_lp(tiny_backbone)
    torch.manual_seed(3)
    fresh = torch.nn.Linear(tiny_backbone.embed_dim, len(CLASSNAMES))  # the official classifier's draw
    torch.testing.assert_close(module.probe.bias, fresh.bias)
    feats, labels = train_set(tiny_backbone)
    normed = F.normalize(feats, dim=-1)
    start = copy.deepcopy(module)
    with torch.enable_grad():
        solve(start, normed, labels, method.train_text, steps=0, alpha_every=10, alpha_scale=250.0)
    sums = torch.stack([normed[labels == c].sum(0) for c in range(len(CLASSNAMES))])  # sums, not means
    torch.testing.assert_close(start.probe.weight, sums)
    assert torch.allclose(start.alpha, start.alpha[0].expand_as(start.alpha))  # one value for every class
    torch.testing.assert_close(start.probe.bias, fresh.bias)


def reference_solver(model, f, y, t, steps, every, lr_w, lr_alpha):
    """A straightforward transcription of the official loop's order of operations, for the test."""
    w, b = model.probe.weight, model.probe.bias
    alpha = model.alpha
    opt = torch.optim.SGD([w, b], lr=lr_w, momentum=0.9)
    grad_sum = torch.zeros_like(alpha)
    for step in range(steps):
        loss = F.cross_entropy(f @ w.t() + b + alpha * (f @ t.t()), y)
        opt.zero_grad()
        g_alpha, = torch.autograd.grad(loss, alpha, retain_graph=True)
        loss.backward()
        opt.step()
        grad_sum += g_alpha
        if (step + 1) % every == 0:
            with torch.no_grad():
                alpha -= lr_alpha * grad_sum  # the accumulated gradient, never reset
    return model


def test_solver_accumulates_the_alpha_gradient_as_the_official_code(tiny_backbone):
    method, module = setup_lp(tiny_backbone)
    feats, labels = train_set(tiny_backbone)
    f, t = F.normalize(feats, dim=-1), method.train_text
    ours, theirs, start = copy.deepcopy(module), copy.deepcopy(module), copy.deepcopy(module)
    with torch.enable_grad():
        solve(start, f, labels, t, steps=0, alpha_every=10, alpha_scale=250.0)
        theirs.load_state_dict(start.state_dict())
        losses = solve(ours, f, labels, t, steps=25, alpha_every=10, alpha_scale=250.0)
        reference_solver(theirs, f, labels, t, 25, 10, step_size_w(f), step_size_alpha(f @ t.t()))
    torch.testing.assert_close(ours.alpha, theirs.alpha)
    torch.testing.assert_close(ours.probe.weight, theirs.probe.weight)
    assert len(losses) == 25 and losses[-1] < losses[0]
    assert not torch.equal(ours.alpha, start.alpha)


def test_solver_refuses_a_class_without_images(tiny_backbone):
    from benchsuite.errors import BenchsuiteError

    method, module = setup_lp(tiny_backbone)
    feats, labels = train_set(tiny_backbone, n_classes=3)
    with pytest.raises(BenchsuiteError, match="cover 3 of 4 classes"):
        method.fit_features(feats[None], labels)


def test_fit_features_runs_under_no_grad_and_uses_every_view(tiny_backbone):
    method, module = setup_lp(tiny_backbone, solver_steps=20)
    feats, labels = train_set(tiny_backbone)
    with torch.no_grad():
        method.fit_features(torch.stack([feats, feats.flip(0)]), labels)
    assert len(method.losses) == 20 and method.losses[-1] < method.losses[0]
    assert module.probe.weight.shape == (len(CLASSNAMES), tiny_backbone.embed_dim)
    sums = torch.stack([F.normalize(feats, dim=-1)[labels == c].sum(0) for c in range(len(CLASSNAMES))])
    assert not torch.allclose(module.probe.weight, sums)  # it trained


def test_imagenet_uses_the_seven_template_ensemble(tiny_backbone):
    method, _ = setup_lp(tiny_backbone, dataset="imagenet")
    names = [c.replace("_", " ") for c in CLASSNAMES]
    per = [F.normalize(tiny_backbone.encode_text([t.format(n) for n in names]), dim=-1) for t in IMAGENET_TEMPLATES]
    torch.testing.assert_close(method.train_text, F.normalize(torch.stack(per).mean(0), dim=-1))
    assert len(IMAGENET_TEMPLATES) == 7
    other, _ = setup_lp(tiny_backbone, dataset="oxford_pets", template="a photo of a {}, a type of pet.")
    torch.testing.assert_close(other.train_text, text_classifier(tiny_backbone, CLASSNAMES,
                                                                 ("a photo of a {}, a type of pet.",)))


def fitted(backbone):
    torch.manual_seed(0)
    method, module = setup_lp(backbone, solver_steps=30)
    feats, labels = train_set(backbone)
    method.fit_features(feats[None], labels)
    return method, module


def test_seen_classes_keep_their_trained_weights_in_any_order(tiny_backbone):
    method, module = fitted(tiny_backbone)
    order = [2, 0, 3, 1]
    names = [CLASSNAMES[i] for i in order]
    f = train_set(tiny_backbone, seed=5)[0]
    with torch.no_grad():
        method.prepare_eval(CLASSNAMES, "caltech101", PHOTO, LabelSpace.of("caltech101", CLASSNAMES, "caltech101",
                                                                         CLASSNAMES))
        full = method.predict(EvalBatch(labels=torch.zeros(len(f), dtype=torch.long), image_features=f))
        expected = module.logits(F.normalize(f, dim=-1), method.train_text)
        method.prepare_eval(names, "caltech101", PHOTO, LabelSpace.of("caltech101", CLASSNAMES, "caltech101", names))
        permuted = method.predict(EvalBatch(labels=torch.zeros(len(f), dtype=torch.long), image_features=f))
    torch.testing.assert_close(full, expected)
    torch.testing.assert_close(permuted, full[:, order])


def test_unseen_classes_fall_back_to_the_zero_shot_classifier(tiny_backbone):
    method, module = fitted(tiny_backbone)
    new = ["chair", "water_lilly", "yin yang"]
    f = train_set(tiny_backbone, seed=6)[0]
    batch = EvalBatch(labels=torch.zeros(len(f), dtype=torch.long), image_features=f)
    zero_shot = ZeroshotCLIP()
    zero_shot.backbone = tiny_backbone
    with torch.no_grad():
        method.prepare_eval(new, "caltech101", PHOTO, LabelSpace.of("caltech101", CLASSNAMES, "caltech101", new))
        got = method.predict(batch)
        zero_shot.prepare_eval(new, "caltech101", PHOTO)
        zs = zero_shot.predict(batch)
    torch.testing.assert_close(got, module.alpha.detach().mean() * zs / tiny_backbone.logit_scale)
    # a mixed set: seen classes as trained, the unseen one as mean(alpha) * cos
    mixed = ["cat", "chair"]
    with torch.no_grad():
        method.prepare_eval(mixed, "caltech101", PHOTO, LabelSpace.of("caltech101", CLASSNAMES, "caltech101", mixed))
        both = method.predict(batch)
        normed = F.normalize(f, dim=-1)
        cat = module.logits(normed, method.train_text)[:, 1]
        chair = module.alpha.detach().mean() * normed @ text_classifier(tiny_backbone, ["chair"], (PHOTO,)).t()
    torch.testing.assert_close(both, torch.stack([cat, chair[:, 0]], dim=1))


def _run(tmp_path, tiny_checkpoint, data_root, method: str, name: str):
    results = tmp_path / name
    code, out, err = run_quiet(run_args("base2new", tiny_checkpoint, data_root, results, "--method", method,
                                        "--dataset", "eurosat", "--seeds", "1", "--quiet"))
    assert code == 0, out + err
    ((_, result),) = load_results(results).items()
    return result


def test_base2new_run_is_training_free_and_new_classes_score_as_zero_shot(tmp_path, tiny_checkpoint, data_root):
    result = _run(tmp_path, tiny_checkpoint, data_root, "lp_pp", "lp")
    assert validate_result(result) == []
    n_base = result["data"]["train"]["n_classes"]
    assert result["method"]["trainable_params"] == n_base * 32 + 2 * n_base  # w, b and alpha; 32-wide tiny CLIP
    assert result["method"]["recipe"]["epochs"] == 0 and result["timing"]["train_images"] == 0
    assert set(result["metrics"]) == {"base", "new"}
    zero_shot = _run(tmp_path, tiny_checkpoint, data_root, "zeroshot_clip", "zs")
    assert result["metrics"]["new"]["accuracy"] == zero_shot["metrics"]["new"]["accuracy"]
    again = _run(tmp_path, tiny_checkpoint, data_root, "lp_pp", "again")
    assert again["metrics"] == result["metrics"]  # the features the solver sees are drawn from the job's seed
