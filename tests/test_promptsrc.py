"""PromptSRC (methods.md 4.8): frozen anchors, the self-regulating loss terms, Gaussian prompt aggregation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from benchsuite.clip.templates import PROMPTSRC_TEMPLATES
from benchsuite.errors import BenchsuiteError
from benchsuite.hookspecs import SetupContext, TrainBatch
from benchsuite.methods import get_method, job_manager
from benchsuite.protocols import load_protocol
from benchsuite_plugins.promptsrc import PromptSRC

CLASSNAMES = ["golden_retriever", "cat", "sea lion"]


def recipe(protocol: str, dataset: str = "caltech101", shots: int = 16) -> dict:
    pm, _ = job_manager(get_method("promptsrc"))
    return pm.hook.recipe(protocol=load_protocol(protocol), dataset=dataset, shots=shots)


def setup_promptsrc(backbone, protocol="base2new", classnames=CLASSNAMES, **overrides):
    method = PromptSRC()
    r = {**recipe(protocol), **overrides}
    ctx = SetupContext(backbone=backbone, classnames=classnames, dataset="caltech101", template="a photo of a {}.",
                       recipe=r, protocol=load_protocol(protocol), shots=16, seed=1, device=torch.device("cpu"))
    return method, method.setup(ctx)


@pytest.fixture
def few_templates(monkeypatch):
    """Anchors from 3 templates: tests of other mechanics need not encode all 60."""
    import benchsuite_plugins.promptsrc as plugin

    full = plugin.template_anchors
    monkeypatch.setattr(plugin, "template_anchors", lambda b, c: full(b, c, PROMPTSRC_TEMPLATES[:3]))


def test_parameter_count_on_vit_b16(few_templates):
    from benchsuite.clip.backbone import load_backbone

    backbone = load_backbone("ViT-B-16", "none", precision="fp32", device="cpu")
    _, module = setup_promptsrc(backbone, classnames=["cat"])
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == 46_080  # methods.md 4.6 / 4.8


def test_recipes_per_protocol_and_epoch_settings():
    b2n, xd, fs_pets, fs_dtd = (recipe("base2new"), recipe("cross_dataset", "imagenet"),
                                recipe("few_shot", "oxford_pets", 4), recipe("few_shot", "dtd", 4))
    assert (b2n["epochs"], b2n["prompt_depth_text"], b2n["gpa_mean"], b2n["gpa_std"]) == (20, 9, 15, 1)
    assert (xd["epochs"], xd["prompt_depth_vision"], xd["gpa_mean"], xd["gpa_std"]) == (20, 3, 6, 10)
    assert recipe("domain_generalization", "imagenet") == xd
    assert (fs_pets["epochs"], fs_pets["gpa_mean"], fs_pets["gpa_std"]) == (50, 30, 30)
    assert (fs_dtd["gpa_mean"], fs_dtd["gpa_std"]) == (45, 5)
    assert (b2n["text_loss_weight"], b2n["image_loss_weight"], b2n["batch_size"], b2n["lr"]) == (25, 10, 4, 0.0025)
    assert PromptSRC.epoch_settings == ("gpa_mean", "gpa_std") and PromptSRC.image_input == "images+features"


def test_toy_profiles_scale_the_gpa_settings_with_the_epochs():
    from benchsuite.engine.recipe import declarations, resolve_recipe

    entry = get_method("promptsrc")
    for protocol, (epochs, mean, std) in (("toy_base2new", (20, 15, 1)), ("toy_cross_dataset", (20, 6, 10))):
        toy = load_protocol(protocol)
        scaled, _ = resolve_recipe("promptsrc", recipe(protocol, "toy_objects"), toy.profile, {},
                                   **declarations(entry.cls))
        scale = scaled["epochs"] / epochs
        assert scale < 1 and scaled["image_input"] == "images+features"
        assert (scaled["gpa_mean"], scaled["gpa_std"]) == (math.ceil(mean * scale), math.ceil(std * scale))


def test_text_anchors_are_the_mean_of_60_templates(tiny_backbone, monkeypatch):
    import benchsuite_plugins.promptsrc as plugin

    monkeypatch.setattr(plugin, "EVAL_CHUNK", 7)  # 2 templates of 3 classes per call: the grouping is exercised
    method, _ = setup_promptsrc(tiny_backbone)
    assert len(PROMPTSRC_TEMPLATES) == 60 and PROMPTSRC_TEMPLATES[0] == "a photo of a {}."
    with torch.no_grad():
        per_template = [tiny_backbone.model.encode_text(tiny_backbone.tokenize(
            [t.replace("{}", c.replace("_", " ")) for c in CLASSNAMES])) for t in PROMPTSRC_TEMPLATES]
    expected = F.normalize(torch.stack(per_template).mean(0), dim=-1)
    torch.testing.assert_close(method.anchors, expected, atol=1e-5, rtol=0)


def test_loss_terms_follow_their_definitions(tiny_backbone, few_templates):
    torch.manual_seed(0)
    method, module = setup_promptsrc(tiny_backbone)
    with torch.no_grad():  # move the prompts away from the zero-shot point so every term is non-zero
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    out = method.train_step(TrainBatch(images, labels), 0)
    with torch.no_grad():
        text = F.normalize(module.text_features(), dim=-1)
        image = F.normalize(module.image_features(images), dim=-1)
        frozen = F.normalize(tiny_backbone.model.encode_image(images), dim=-1)
        scale = tiny_backbone.logit_scale
        logits, zs = scale * image @ text.t(), scale * frozen @ method.anchors.t()
        p_zs, p = zs.softmax(-1), logits.softmax(-1)
        expected = {
            "ce": -p.log()[torch.arange(4), labels].mean(),
            "scl_text": 25 * (text - method.anchors).abs().mean(),
            "scl_image": 10 * (image - frozen).abs().mean(),
            "scl_kl": (p_zs * (p_zs.log() - p.log())).sum() / (4 * len(CLASSNAMES)),
        }
    for key, value in expected.items():
        assert float(value) > 1e-4, key
        torch.testing.assert_close(out[key].detach(), value, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["loss"].detach(), sum(expected.values()), rtol=1e-4, atol=1e-6)
    # with the harness's frozen features (image_input "images+features") the same loss, from those features
    given = method.train_step(TrainBatch(images, labels, tiny_backbone.encode_image(images).detach()), 0)
    torch.testing.assert_close(given["loss"].detach(), out["loss"].detach())
    other = method.train_step(TrainBatch(images, labels, torch.randn(4, tiny_backbone.embed_dim)), 0)
    assert abs(float(other["scl_image"].detach()) - float(out["scl_image"].detach())) > 1e-3


def gaussian_density(x: float, mu: float, sigma: float) -> float:
    return math.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))


@pytest.mark.parametrize("epochs,mean,std", [(4, 3, 1), (3, 2, 10), (2, 15, 1)])
def test_aggregated_prompts_are_the_gaussian_weighted_mean_of_epoch_snapshots(tiny_backbone, few_templates, epochs,
                                                                            mean, std):
    torch.manual_seed(0)
    method, module = setup_promptsrc(tiny_backbone, gpa_mean=mean, gpa_std=std)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    snapshots = []
    for epoch in range(epochs):
        out = method.train_step(TrainBatch(images, labels), epoch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        snapshots.append({k: v.detach().clone() for k, v in module.state_dict().items()})
        method.epoch_end(epoch, epochs)
    last = snapshots[-1]
    method.train_end()
    density = [gaussian_density(e, mean, std) for e in range(1, epochs + 1)]  # the official formula, normalised
    if sum(density) > 0:
        weights = [d / sum(density) for d in density]
    else:  # mean far beyond the run: all weight on the nearest epoch
        weights = [0.0] * (epochs - 1) + [1.0]
    state = module.state_dict()
    assert set(state) == set(last)
    for key in state:
        expected = sum(w * s[key].double() for w, s in zip(weights, snapshots))
        torch.testing.assert_close(state[key].double(), expected, atol=1e-6, rtol=1e-6)
    assert any(not torch.allclose(state[k], last[k]) for k in state) or weights[-1] > 0.999


def test_the_gpa_sum_resumes_from_its_training_state(tiny_backbone, few_templates, tmp_path):
    """The running sum of epochs 1-2 goes through a weights-only checkpoint file: an instance resumed
    from it (module state loaded as the harness does) aggregates exactly like the uninterrupted one."""
    torch.manual_seed(0)
    method, module = setup_promptsrc(tiny_backbone, gpa_mean=2, gpa_std=1)

    def epoch(m, mod, index):
        with torch.no_grad():
            for p in (p for p in mod.parameters() if p.requires_grad):
                p.add_(0.1 * (index + 1))
        m.epoch_end(index, 4)

    for index in range(2):
        epoch(method, module, index)
    torch.save(method.training_state(), tmp_path / "state.pt")
    resumed, resumed_module = setup_promptsrc(tiny_backbone, gpa_mean=2, gpa_std=1)
    resumed_module.load_state_dict(module.state_dict())
    resumed.load_training_state(torch.load(tmp_path / "state.pt", weights_only=True))
    for index in range(2, 4):
        epoch(method, module, index)
        epoch(resumed, resumed_module, index)
    method.train_end(), resumed.train_end()
    for key, value in module.state_dict().items():
        torch.testing.assert_close(resumed_module.state_dict()[key], value, atol=0, rtol=0)


def test_a_non_positive_gpa_std_is_refused_in_one_line(tiny_backbone, few_templates):
    with pytest.raises(BenchsuiteError, match="gpa_std must be > 0"):
        setup_promptsrc(tiny_backbone, gpa_std=0)


def test_ivlp_and_promptsrc_run_end_to_end(tmp_path, tiny_checkpoint, data_root):
    """Through the CLI on one fixture dataset (base 3 / new 2 classes), 2 epochs with GPA over both."""
    import json

    from test_run import assert_valid, run_args, run_quiet

    results = tmp_path / "results"
    argv = run_args("base2new", tiny_checkpoint, data_root, results, "--method", "ivlp", "promptsrc", "--dataset",
                    "oxford_pets", "--seeds", "1", "--set", "epochs=2", "promptsrc.gpa_mean=1", "promptsrc.gpa_std=1")
    code, out, err = run_quiet(argv)
    assert code == 0, out + err
    for method in ("ivlp", "promptsrc"):
        (result,) = [json.loads(p.read_text()) for p in (results / "base2new" / method / "oxford_pets").glob("*.json")]
        assert_valid(result)
        assert set(result["metrics"]) == {"base", "new"}
