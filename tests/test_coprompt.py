"""CoPrompt (ShuvenduRoy/CoPrompt): adapters on MaPLe prompts, the two consistency terms against an
independent computation, the description file (sha256, coverage, errors), the seeded description draw,
the second view, recipes and a run through the CLI."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F

from benchsuite.errors import BenchsuiteError
from benchsuite.hookspecs import EvalBatch, SetupContext, TrainBatch, method_setting
from benchsuite.methods import get_method, job_manager
from benchsuite.protocols import load_protocol
from benchsuite_plugins import coprompt as cp
from benchsuite_plugins.coprompt import CoPrompt
from test_run import load_results, run_args, run_quiet

CLASSNAMES = ["golden_retriever", "cat", "sea lion"]
DESCRIPTIONS = {"golden retriever": ["a big golden dog.", "a retriever with long fur."],
                "cat": ["a small feline.", "a cat with whiskers."],
                "sea lion": ["a marine mammal with flippers.", "a sea lion on a rock."]}


def recipe(protocol: str = "base2new", dataset: str = "caltech101", shots: int = 16) -> dict:
    pm, _ = job_manager(get_method("coprompt"))
    return pm.hook.recipe(protocol=load_protocol(protocol), dataset=dataset, shots=shots)


def write_descriptions(folder, data=DESCRIPTIONS):
    path = folder / "descriptions.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def setup_coprompt(backbone, tmp_path, classnames=CLASSNAMES, data=DESCRIPTIONS, seed=1, **overrides):
    path, sha = write_descriptions(tmp_path, data)
    method = CoPrompt()
    r = {**recipe(), "descriptions": str(path), "descriptions_sha256": sha, **overrides}
    ctx = SetupContext(backbone=backbone, classnames=classnames, dataset="caltech101", template="a photo of a {}.",
                       recipe=r, protocol=load_protocol("base2new"), shots=16, seed=seed, device=torch.device("cpu"))
    return method, method.setup(ctx)


def n_trainable(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_declarations():
    assert method_setting(CoPrompt) == "external-text"
    assert CoPrompt.extra_knowledge == ("LLM class descriptions",) and CoPrompt.image_input == "images"


def test_parameter_count_on_vit_b16(tmp_path):
    from benchsuite.clip.backbone import load_backbone

    vit = load_backbone("ViT-B-16", "none", precision="fp32", device="cpu")
    _, module = setup_coprompt(vit, tmp_path)
    assert n_trainable(module) == 3_555_072 + 2 * 2 * 512 * 128  # MaPLe at depth 9 + two 512-128-512 adapters
    assert n_trainable(module.prompts) == 3_555_072
    assert tuple(module.adapter_text.fc[0].weight.shape) == (128, 512) and module.adapter_text.fc[0].bias is None


@pytest.mark.parametrize("protocol", ["base2new", "cross_dataset", "domain_generalization", "few_shot"])
def test_recipe_is_the_released_config(protocol):
    r = recipe(protocol, "caltech101", 16)
    assert (r["epochs"], r["batch_size"], r["lr"], r["n_ctx"], r["ctx_init"], r["prompt_depth"]) == \
        (8, 4, 0.0035, 2, "a photo of a", 9)
    assert (r["image_adapter_ratio"], r["text_adapter_ratio"], r["consistency_weight"], r["distill"]) == \
        (0.1, 0.2, 1.0, "cosine")
    assert (r["descriptions"], r["descriptions_sha256"]) == ("gpt_file/caltech_prompt.json",
                                                            cp.OFFICIAL_DESCRIPTIONS["caltech101"][1])


def test_default_description_files_per_dataset():
    assert recipe(dataset="fgvc_aircraft")["descriptions"] == "gpt_file/fgvc_prompt.json"
    assert recipe(dataset="imagenet")["descriptions_sha256"] == ""  # not readable in the mirrored snapshot
    toy = recipe("toy_base2new", "toy_objects")
    assert toy["descriptions"] == cp.TOY_DESCRIPTIONS
    assert toy["descriptions_sha256"] == hashlib.sha256(cp.toy_descriptions_path().read_bytes()).hexdigest()


def test_toy_descriptions_cover_every_toy_class_equally():
    from benchsuite.toy.datasets import toy_classnames, toy_dataset_names

    data = json.loads(cp.toy_descriptions_path().read_text(encoding="utf-8"))
    for name in toy_dataset_names():
        texts = cp.load_descriptions(cp.toy_descriptions_path(), recipe("toy_base2new", name)["descriptions_sha256"],
                                     toy_classnames(name), label=name)
        assert {len(t) for t in texts} == {4}
    assert len(data) == 49


def test_description_file_errors(tiny_backbone, tmp_path):
    with pytest.raises(BenchsuiteError, match=r"coprompt: description file .*nowhere.json.* not found.*descriptions="):
        cp.resolve_descriptions(str(tmp_path / "nowhere.json"), "caltech101")
    with pytest.raises(BenchsuiteError, match="no LLM class-description file"):
        cp.resolve_descriptions("", "my_dataset")
    path, sha = write_descriptions(tmp_path)
    with pytest.raises(BenchsuiteError, match=f"has sha256 {sha}.*descriptions_sha256={sha}"):
        cp.load_descriptions(path, "0" * 64, CLASSNAMES, label="x")
    with pytest.raises(BenchsuiteError, match="does not describe the training class.*'dog'"):
        cp.load_descriptions(path, sha, [*CLASSNAMES, "dog"], label="x")
    with pytest.raises(BenchsuiteError, match="different numbers of descriptions"):
        setup_coprompt(tiny_backbone, tmp_path, data={**DESCRIPTIONS, "cat": ["one only."]})
    with pytest.raises(BenchsuiteError, match="longer than the text encoder"):
        setup_coprompt(tiny_backbone, tmp_path, data={**DESCRIPTIONS, "cat": ["word " * 80, "short."]})


def test_description_targets_are_the_normalised_frozen_features(tiny_backbone, tmp_path):
    method, _ = setup_coprompt(tiny_backbone, tmp_path)
    names = [c.replace("_", " ") for c in CLASSNAMES]
    for c, name in enumerate(names):
        for j, text in enumerate(DESCRIPTIONS[name]):
            want = F.normalize(tiny_backbone.encode_text([text]).float(), dim=-1)[0]
            torch.testing.assert_close(method.descriptions[j, c], want, rtol=1e-5, atol=1e-6)


def test_loss_parts_against_an_independent_computation(tiny_backbone, tmp_path):
    method, module = setup_coprompt(tiny_backbone, tmp_path)
    size = tiny_backbone.image_size
    images, view = torch.randn(3, 3, size, size), torch.randn(3, 3, size, size)
    labels = torch.tensor([0, 2, 1])
    index = int(torch.randint(2, (1,), generator=torch.Generator().manual_seed(1)))  # the seeded first draw
    out = method.train_step(TrainBatch(images=images, labels=labels, views=[view]), 0)

    def adapt(adapter, f, ratio):
        hidden = torch.relu(f @ adapter.fc[0].weight.t())
        return F.normalize(ratio * torch.relu(hidden @ adapter.fc[2].weight.t()) + (1 - ratio) * f, dim=-1)

    with torch.no_grad():
        text = adapt(module.adapter_text, module.prompts.text_features(), 0.2)
        image = adapt(module.adapter_image, module.prompts.image_features(tiny_backbone, images), 0.1)
        frozen = F.normalize(tiny_backbone.encode_image(view), dim=-1)
        target = F.normalize(tiny_backbone.encode_text([DESCRIPTIONS[c.replace("_", " ")][index]
                                                        for c in CLASSNAMES]), dim=-1)
    ce = F.cross_entropy(tiny_backbone.logit_scale * image @ text.t(), labels)
    c_text = 1 - (text * target).sum(-1).mean()
    c_image = 1 - (image * frozen).sum(-1).mean()
    torch.testing.assert_close(out["ce"], ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["consistency_text"], c_text, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["consistency_image"], c_image, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], ce + c_text + c_image, rtol=1e-5, atol=1e-6)
    # predict: the same adapted features and logits
    with torch.no_grad():
        method.prepare_eval(CLASSNAMES, "caltech101", "a photo of a {}.")
        logits = method.predict(EvalBatch(labels=labels, images=images))
    torch.testing.assert_close(logits, tiny_backbone.logit_scale * image @ text.t(), rtol=1e-5, atol=1e-5)


def test_the_image_target_is_the_second_view_and_gradients_reach_the_adapters(tiny_backbone, tmp_path):
    method, module = setup_coprompt(tiny_backbone, tmp_path, consistency_weight=2.0)
    size = tiny_backbone.image_size
    images, labels = torch.randn(2, 3, size, size), torch.tensor([0, 1])
    a = method.train_step(TrainBatch(images=images, labels=labels, views=[images]), 0)
    method.generator.manual_seed(1)
    b = method.train_step(TrainBatch(images=images, labels=labels, views=[torch.randn(2, 3, size, size)]), 0)
    torch.testing.assert_close(a["ce"], b["ce"])
    torch.testing.assert_close(a["consistency_text"], b["consistency_text"])
    assert not torch.allclose(a["consistency_image"], b["consistency_image"])
    torch.testing.assert_close(b["loss"], b["ce"] + 2.0 * (b["consistency_text"] + b["consistency_image"]))
    b["loss"].backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert len(method.train_views(tiny_backbone.image_spec)) == 1
    with pytest.raises(BenchsuiteError, match="second augmented view"):
        method.train_step(TrainBatch(images=images, labels=labels), 0)


def test_description_draws_are_seeded_and_resumable(tiny_backbone, tmp_path):
    many = {k: [f"{k} number {i}." for i in range(7)] for k in DESCRIPTIONS}
    m1, _ = setup_coprompt(tiny_backbone, tmp_path, data=many, seed=5)
    m2, _ = setup_coprompt(tiny_backbone, tmp_path, data=many, seed=5)
    first = [m1.next_description() for _ in range(6)]
    state = m1.training_state()
    after = [m1.next_description() for _ in range(6)]
    assert first == [m2.next_description() for _ in range(6)] and len(set(first + after)) > 1
    m3, _ = setup_coprompt(tiny_backbone, tmp_path, data=many, seed=6)
    m3.load_training_state(state)
    assert [m3.next_description() for _ in range(6)] == after


def test_base2new_job_through_the_cli(tmp_path, tiny_checkpoint, tiny_backbone, data_root):
    from fixture_data import EXPECTED

    path, sha = write_descriptions(tmp_path, {c.replace("_", " "): [f"a {c} texture.", f"a photo of {c}."]
                                              for c in EXPECTED["dtd"].classnames})
    results = tmp_path / "results"
    code, out, err = run_quiet(run_args("base2new", tiny_checkpoint, data_root, results, "--method", "coprompt",
                                        "--dataset", "dtd", "--seeds", "1", "--set", "epochs=2",
                                        f"coprompt.descriptions={path}", f"coprompt.descriptions_sha256={sha}",
                                        "--quiet"))
    assert code == 0, out + err
    (result,) = load_results(results).values()
    assert set(result["metrics"]) == {"base", "new"}
    assert result["method"]["setting"] == "external-text"
    assert result["method"]["recipe"]["descriptions_sha256"] == sha
    assert result["method"]["trainable_params"] == 2 * (2 * 64 + 64 * 64 + 64) + 2 * 2 * 32 * 8
    assert set(result["training"]["loss_per_epoch"]) == {"loss", "ce", "consistency_text", "consistency_image"}
    # the default recipe without the file: one line naming the option
    code, out, err = run_quiet(run_args("base2new", tiny_checkpoint, data_root, tmp_path / "r2", "--method",
                                        "coprompt", "--dataset", "dtd", "--seeds", "1", "--set", "epochs=2"))
    assert code != 0 and "coprompt: description file gpt_file/dtd_prompt.json" in out + err


def test_parameters_are_drawn_in_the_official_order(tiny_backbone, tmp_path):
    """The official CustomCLIP builds the prompt learner (MaPLe's order), then adapter_image, then adapter_text."""
    from benchsuite_plugins.clip_adapter import Adapter
    from benchsuite_plugins.maple import MultiModalPrompts

    torch.manual_seed(3)
    _, module = setup_coprompt(tiny_backbone, tmp_path)
    torch.manual_seed(3)
    prompts = MultiModalPrompts(tiny_backbone, 2, "a photo of a", 9)
    image, text = Adapter(tiny_backbone.embed_dim), Adapter(tiny_backbone.embed_dim)
    for got, want in zip(module.parameters(), [*prompts.parameters(), *image.parameters(), *text.parameters()],
                         strict=True):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=0, atol=0)
    assert not torch.equal(module.adapter_image.fc[0].weight, module.adapter_text.fc[0].weight)
