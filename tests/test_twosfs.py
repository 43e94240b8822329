"""2SFS: recipe, the stage-1 trainable set, the stage switch, selective inference, a run through the CLI."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchsuite.clip.integrity import backbone_print, changes
from benchsuite.clip.lora import ExplicitAttention
from benchsuite.engine.recipe import resolve_recipe
from benchsuite.engine.train import make_optimizer
from benchsuite.errors import BenchsuiteError
from benchsuite.hookspecs import EvalBatch, LabelSpace, TrainBatch
from benchsuite_plugins.twosfs import TwoSFS, stage_one_steps
from method_setup import build, default_recipe
from test_run import load_results, run_quiet

CLASSNAMES = ["annual_crop", "forest", "highway"]


def recipe(protocol: str = "few_shot", dataset: str = "dtd", shots: int = 16) -> dict:
    return default_recipe("twosfs", protocol, dataset, shots)


def setup_method(backbone, classnames=CLASSNAMES, **overrides):
    return build(TwoSFS, backbone, classnames, **overrides)


def batch(n: int = 4) -> TrainBatch:
    return TrainBatch(torch.randn(n, 3, 32, 32), torch.arange(n) % len(CLASSNAMES))


def trainable(module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("protocol,dataset,shots", [("few_shot", "dtd", 1), ("few_shot", "imagenet", 8),
                                                    ("base2new", "eurosat", 16), ("cross_dataset", "imagenet", 16)])
def test_recipe_is_the_official_fixed_one(protocol, dataset, shots):
    r = recipe(protocol, dataset, shots)
    assert (r["iterations"], r["alpha"], r["epochs"], r["warmup_epochs"]) == (300 * shots, 0.6, 0, 0)
    assert (r["optimizer"], r["lr"], r["min_lr"], r["betas"], r["eps"], r["weight_decay"], r["batch_size"]) == (
        "adamw", 2e-4, 1e-6, [0.9, 0.999], 1e-8, 1e-2, 32)
    assert (r["peft"], r["encoders"], r["layernorms"], r["template"]) == ("ln", "both", "blocks", "a photo of a {}.")
    resolved, _ = resolve_recipe("twosfs", r, {}, {}, image_input="images")
    assert resolved["iterations"] == 300 * shots


def test_stage_split_is_the_official_int_of_alpha_times_budget():
    assert stage_one_steps(4800, 0.6) == 2880 and stage_one_steps(300, 0.6) == 180
    assert stage_one_steps(4, 0.6) == 2 and stage_one_steps(5, 0.6) == 3 and stage_one_steps(7, 1.0) == 7


def test_stage_one_trains_block_layernorms_of_both_towers_and_the_classifier_exists(tiny_backbone):
    before = backbone_print(tiny_backbone.model)
    method, module, _ = setup_method(tiny_backbone)
    names = trainable(module)
    norms = {n for n in names if n != "classifier"}
    assert norms and all(".resblocks." in n and (".ln_1." in n or ".ln_2." in n) for n in norms)
    assert any(n.startswith("clip.visual.") for n in norms) and any(n.startswith("clip.transformer.") for n in norms)
    per_tower = 2 * 2 * 2 * 64  # layers x (ln_1, ln_2) x (weight, bias) x width
    assert sum(names[n].numel() for n in norms) == 2 * per_tower
    assert names["classifier"].shape == (len(CLASSNAMES), tiny_backbone.embed_dim)
    _, full, _ = setup_method(tiny_backbone, layernorms="all")
    extra = set(trainable(full)) - set(names)
    outer = ("visual.ln_pre", "visual.ln_post", "ln_final")
    assert extra == {f"clip.{m}.{w}" for m in outer for w in ("weight", "bias")}
    assert changes(before, backbone_print(tiny_backbone.model)) == []


def test_stage_switch_initialises_the_classifier_from_the_adapted_text_encoder(tiny_backbone):
    method, module, r = setup_method(tiny_backbone, iterations=4)  # 2 + 2 steps
    params = trainable(module)
    opt = make_optimizer(list(params.values()), {**r, "lr": 1e-2})
    module.train()
    norm_name = next(n for n in params if n != "classifier")
    for step in range(4):
        opt.zero_grad(set_to_none=True)
        if step == 2:
            norms_before = {n: p.detach().clone() for n, p in params.items() if n != "classifier"}
        method.train_step(batch(), 0)["loss"].backward()
        if step < 2:
            assert params[norm_name].grad is not None and params["classifier"].grad is None
            assert not bool(module.ready)
        else:
            assert params["classifier"].grad is not None
            assert all(p.grad is None for n, p in params.items() if n != "classifier")
        if step == 2:  # the rows were set at the switch from the stage-1-adapted text encoder
            with torch.no_grad():
                want = method._encode_text(method.train_text, grad=False)
            torch.testing.assert_close(F.normalize(module.classifier.detach(), dim=-1), want)
            assert bool(module.ready)
        opt.step()
    after = {n: p.detach() for n, p in params.items() if n != "classifier"}
    assert all(torch.equal(after[n], norms_before[n]) for n in after)  # stage 2 leaves the LayerNorms alone
    assert method.training_state() == {"step": 4}
    fresh, fresh_module, _ = setup_method(tiny_backbone, iterations=4)
    fresh.load_training_state({"step": 3})
    assert fresh.step == 3


def test_selective_inference_reads_seen_classes_from_the_classifier(tiny_backbone):
    method, module, _ = setup_method(tiny_backbone)
    with torch.no_grad():
        module.classifier.normal_()
        module.ready.fill_(True)
    module.eval()
    evaluated = ["forest", "river", "Annual Crop"]
    space = LabelSpace.of("eurosat", CLASSNAMES, "eurosat", evaluated)
    assert space.seen == (True, False, True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        method.prepare_eval(evaluated, "eurosat", "{} texture.", space)
        logits = method.predict(EvalBatch(labels=torch.zeros(2, dtype=torch.long), images=images))
        rows = F.normalize(module.classifier, dim=-1)
        river = method._encode_text(method._tokens(["river"]), grad=False)[0]
        image = F.normalize(method.backbone.encode_image(images), dim=-1)
    torch.testing.assert_close(method.eval_classifier, torch.stack([rows[1], river, rows[0]]))
    torch.testing.assert_close(logits, tiny_backbone.logit_scale * image @ method.eval_classifier.t())
    new = LabelSpace.of("eurosat", CLASSNAMES, "eurosat", ["river", "pasture"])
    with torch.no_grad():
        method.prepare_eval(["river", "pasture"], "eurosat", "", new)
        want = method._encode_text(method._tokens(["river", "pasture"]), grad=False)
    torch.testing.assert_close(method.eval_classifier, want)


def test_a_restored_module_keeps_its_trained_classifier(tiny_backbone):
    method, module, _ = setup_method(tiny_backbone)
    with torch.no_grad():
        module.classifier.normal_()
        module.ready.fill_(True)
    state = module.state_dict()
    assert "ready" in state and "classifier" in state
    other, restored, _ = setup_method(tiny_backbone)
    restored.load_state_dict(state)
    restored.eval()
    with torch.no_grad():
        other.prepare_eval(CLASSNAMES, "eurosat", "", LabelSpace.of("eurosat", CLASSNAMES, "eurosat", CLASSNAMES))
    torch.testing.assert_close(other.eval_classifier, F.normalize(module.classifier, dim=-1))
    untrained, fresh, _ = setup_method(tiny_backbone)  # never trained: rows start from the text encoder
    fresh.eval()
    with torch.no_grad():
        untrained.prepare_eval(CLASSNAMES, "eurosat", "", LabelSpace.of("eurosat", CLASSNAMES, "eurosat", CLASSNAMES))
        want = untrained._encode_text(untrained.train_text, grad=False)
    torch.testing.assert_close(untrained.eval_classifier, want)


def test_lora_variant_trains_lora_then_the_classifier(tiny_backbone):
    method, module, _ = setup_method(tiny_backbone, peft="lora")
    names = set(trainable(module))
    assert "classifier" in names and all(n.endswith(("lora_A", "lora_B")) for n in names - {"classifier"})
    assert isinstance(module.clip.visual.transformer.resblocks[0].attn, ExplicitAttention)


@pytest.mark.parametrize("key,value,message", [("peft", "bitfit", "peft"), ("encoders", "all", "encoders"),
                                               ("layernorms", "some", "layernorms"), ("alpha", 1.5, "alpha")])
def test_bad_options_are_one_line(tiny_backbone, key, value, message):
    with pytest.raises(BenchsuiteError, match=message):
        setup_method(tiny_backbone, **{key: value})


def test_parameter_count_on_vit_b16():
    from benchsuite.clip.backbone import load_backbone

    vit = load_backbone("ViT-B-16", "none", precision="fp32", device="cpu")
    _, module, _ = setup_method(vit, classnames=["cat", "dog"])
    norms = sum(p.numel() for n, p in module.named_parameters() if p.requires_grad and n != "classifier")
    assert norms == 61_440 == 12 * 2 * 2 * (512 + 768)
    assert module.classifier.numel() == 2 * 512


def test_twosfs_runs_through_the_cli(tmp_path, tiny_checkpoint, data_root):
    code, out, err = run_quiet(["run", "--protocol", "base2new", "--method", "twosfs", "--dataset", "eurosat",
                                "--seeds", "1", "--backbone", "bs-tiny-test", "--pretrained", str(tiny_checkpoint),
                                "--data-root", str(data_root), "--results", str(tmp_path / "r"),
                                "--feature-cache", str(tmp_path / "f"), "--quiet", "--set", "twosfs.iterations=4"])
    assert code == 0, out + err  # a job that changed the shared backbone would have its result refused
    (result,) = load_results(tmp_path / "r").values()
    n_base = result["data"]["train"]["n_classes"]
    assert result["method"]["trainable_params"] == 2 * 2 * 2 * 2 * 64 + n_base * 32
    assert result["method"]["recipe"]["iterations"] == 4 and result["method"]["recipe"]["epochs"] == 0
    assert set(result["metrics"]) == {"base", "new"}
    assert sum(len(v) for v in result["training"]["loss_per_epoch"].values()) >= 1
