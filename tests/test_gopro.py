"""GOPro (methods.md 4.10): style statistic, conditioning, loss terms, views, parameter count, CLI run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from benchsuite.clip.prompts import context_from_words
from benchsuite.errors import BenchsuiteError
from benchsuite.hookspecs import EvalBatch, SetupContext, TrainBatch
from benchsuite.methods import get_method, job_manager
from benchsuite.protocols import load_protocol
from benchsuite_plugins.gopro import STYLE_EPS, AugMixView, GOPro, simclr_loss, style_statistics

CLASSNAMES = ["golden_retriever", "cat", "sea lion"]


def recipe(protocol: str = "base2new", dataset: str = "caltech101", shots: int = 16) -> dict:
    pm, _ = job_manager(get_method("gopro"))
    return pm.hook.recipe(protocol=load_protocol(protocol), dataset=dataset, shots=shots)


def setup_gopro(backbone, classnames=CLASSNAMES, **overrides):
    method = GOPro()
    ctx = SetupContext(backbone=backbone, classnames=classnames, dataset="caltech101", template="a photo of a {}.",
                       recipe={**recipe(), **overrides}, protocol=load_protocol("base2new"), shots=16, seed=1,
                       device=torch.device("cpu"))
    return method, method.setup(ctx)


def images(backbone, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, backbone.image_size, backbone.image_size, generator=g)


def test_style_statistic_matches_its_definition():
    """mu = mean over tokens; sigma = sqrt((sum of squared deviations + 2.3e-8) / T): epsilon inside the sum."""
    tokens = torch.randn(3, 2, 197, 16, dtype=torch.float64)
    mu, sigma = style_statistics(tokens)
    n = tokens.shape[-2]
    torch.testing.assert_close(mu, tokens.mean(dim=-2).float())
    expected = (tokens.var(dim=-2, unbiased=False) + STYLE_EPS / n).sqrt()
    torch.testing.assert_close(sigma, expected.float())
    constant = torch.full((1, 1, 197, 4), 3.0)  # zero spread: sigma is sqrt(eps / T), not 0 and not sqrt(eps)
    mu, sigma = style_statistics(constant)
    torch.testing.assert_close(mu, torch.full((1, 1, 4), 3.0))
    torch.testing.assert_close(sigma, torch.full((1, 1, 4), (STYLE_EPS / 197) ** 0.5))


def test_conditioning_uses_every_block_and_shifts_every_context_vector_alike(tiny_backbone):
    method, module = setup_gopro(tiny_backbone)
    x = images(tiny_backbone, 2)
    features, tokens = tiny_backbone.encode_image(x, return_block_tokens=True)
    assert tokens.shape[0] == tiny_backbone.vision_layers
    c = module.conditioner
    expected = []
    for i in range(2):  # per image, per layer, by hand
        per_layer = []
        for layer in range(tokens.shape[0]):
            t = tokens[layer, i]
            mu = t.mean(dim=0)
            sigma = ((t - mu).pow(2).sum(dim=0).add(STYLE_EPS) / t.shape[0]).sqrt()
            per_layer.append((c.style[layer]((mu + sigma) / 2) + c.content[layer](mu)) / 2)
        stacked = torch.stack(per_layer, dim=1)            # [text_width, layers]
        expected.append(stacked @ c.rho.weight[0] + c.rho.bias[0])
    f, shift = module.encode_views(tiny_backbone, x)
    torch.testing.assert_close(shift, torch.stack(expected), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f, F.normalize(features, dim=-1))
    assert not torch.allclose(shift[0], shift[1])  # per-image prompts
    # the assembled prompts of image i hold ctx + shift_i in every context slot
    ctx = module.ctx.unsqueeze(0) + shift.unsqueeze(1)
    assembled = module.prompts.assemble(ctx, groups=True)
    for i in range(2):
        torch.testing.assert_close(assembled[i, :, 1:5] - module.ctx.detach(), shift[i].expand(3, 4, -1))


def test_parameter_count_on_vit_b16():
    from benchsuite.clip.backbone import load_backbone

    vit_b16 = load_backbone("ViT-B-16", "none", precision="fp32", device="cpu")
    _, module = setup_gopro(vit_b16, ["cat", "dog"])
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    # ctx + style + content + rho + sim-projector (methods.md 4.10: ~9.72 M without the unused meta-net)
    assert trainable == 2_048 + 4_724_736 + 4_724_736 + 13 + 263_680 == 9_715_213


def test_recipe_is_the_official_config_for_every_protocol():
    for r in (recipe("base2new"), recipe("cross_dataset", "imagenet"), recipe("few_shot", "dtd", 2)):
        assert r == {"epochs": 50, "batch_size": 4, "lr": 0.002, "n_ctx": 4, "ctx_init": "a photo of a"}
    assert GOPro.min_batch_size == 2


def test_default_context_is_the_four_init_words(tiny_backbone):
    _, module = setup_gopro(tiny_backbone)
    assert torch.equal(module.ctx.data, context_from_words(tiny_backbone, "a photo of a", 4))
    assert (module.prompts.n_ctx, module.prompts.prefix_text) == (4, "a photo of a")


def test_empty_ctx_init_is_the_official_random_init(tiny_backbone):
    """GOPro@e284586 PromptLearner: an empty CTX_INIT gives N_CTX vectors N(0, 0.02^2) behind "X"s."""
    torch.manual_seed(7)
    _, module = setup_gopro(tiny_backbone, n_ctx=6, ctx_init="")
    torch.manual_seed(7)
    expected = torch.nn.init.normal_(torch.empty(6, tiny_backbone.text_width), std=0.02)
    assert torch.equal(module.ctx.data, expected)
    assert (module.prompts.n_ctx, module.prompts.prefix_text) == (6, "X X X X X X")
    x = images(tiny_backbone, 2)
    _, shift = module.encode_views(tiny_backbone, x)
    assert module.text_features(shift).shape == (2, len(CLASSNAMES), tiny_backbone.embed_dim)


@pytest.mark.parametrize("n_ctx", [6, 2])
def test_n_ctx_other_than_the_init_words_is_one_clear_error(tiny_backbone, n_ctx):
    """The official code learns one vector per init word (4) and ignores N_CTX: refused, not ignored."""
    with pytest.raises(BenchsuiteError) as info:
        setup_gopro(tiny_backbone, n_ctx=n_ctx)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"gopro: n_ctx={n_ctx} conflicts with ctx_init='a photo of a'")
    assert "official GOPro code learns one context vector per word" in message and "gopro.n_ctx=4" in message


def test_empty_ctx_init_needs_a_context_vector(tiny_backbone):
    with pytest.raises(BenchsuiteError, match=r"^gopro: n_ctx=0 with an empty ctx_init"):
        setup_gopro(tiny_backbone, n_ctx=0, ctx_init="")


def test_simclr_matches_a_direct_nt_xent():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    an, bn = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    losses = []
    for x, y in ((an, bn), (bn, an)):
        for i in range(4):  # positive y_i among y_j (all j) and x_j (j != i)
            others = torch.cat([y @ x[i], torch.stack([x[j] @ x[i] for j in range(4) if j != i])]) / 0.1
            losses.append(-F.log_softmax(others, dim=0)[i])
    expected = torch.stack(losses[:4]).mean() / 2 + torch.stack(losses[4:]).mean() / 2
    torch.testing.assert_close(simclr_loss(a, b), expected)


def test_loss_is_ce_plus_consistency_plus_weighted_simclr(tiny_backbone):
    method, module = setup_gopro(tiny_backbone)
    x, labels = images(tiny_backbone, 3), torch.tensor([0, 1, 2])
    same = method.losses(x, x.clone(), x.clone(), labels)
    assert float(same["consistency"]) < 1e-12  # identical views: identical conditioned text features
    moco, aug = images(tiny_backbone, 3, seed=1), images(tiny_backbone, 3, seed=2)
    out = method.losses(x, moco, aug, labels)
    f, shift = module.encode_views(tiny_backbone, x)
    t = module.text_features(shift)
    logits = tiny_backbone.logit_scale * torch.stack([t[i] @ f[i] for i in range(3)])
    torch.testing.assert_close(out["logits"], logits)
    torch.testing.assert_close(out["ce"], F.cross_entropy(logits, labels))
    t_m = module.text_features(module.encode_views(tiny_backbone, moco)[1])
    t_a = module.text_features(module.encode_views(tiny_backbone, aug)[1])
    torch.testing.assert_close(out["consistency"], F.mse_loss(t, t_m) + F.mse_loss(t, t_a))
    assert float(out["simclr"]) > 0
    torch.testing.assert_close(out["loss"], out["ce"] + out["consistency"] + 0.1 * out["simclr"])
    out["loss"].backward()
    assert module.ctx.grad.abs().sum() > 0 and module.conditioner.rho.weight.grad.abs().sum() > 0
    assert module.simproj.linear.weight.grad.abs().sum() > 0


def test_a_batch_of_one_skips_only_the_simclr_term(tiny_backbone):
    method, module = setup_gopro(tiny_backbone)
    module.train()
    x = images(tiny_backbone, 1)
    out = method.train_step(TrainBatch(images=x, labels=torch.tensor([1]), views=[x.flip(-1), x.flip(-2)]), 0)
    assert float(out["simclr"]) == 0.0 and float(out["consistency"]) > 0
    torch.testing.assert_close(out["loss"], out["ce"] + out["consistency"])


def test_views_are_seeded_tensors_of_the_backbone_size(tiny_backbone):
    method = GOPro()
    views = method.train_views(tiny_backbone.image_spec)
    assert len(views) == 2
    image = Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy())
    size = tiny_backbone.image_size
    for view in views:
        torch.manual_seed(3)
        a = view(image)
        torch.manual_seed(3)
        b = view(image)
        assert a.shape == (3, size, size) and a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    mix = AugMixView(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    torch.manual_seed(0)
    out = mix(image)
    assert out.min() >= 0 and out.max() <= 1  # a convex mix of images in [0, 1]


def test_predict_is_fp32_logits_of_per_image_prompts(tiny_backbone):
    method, module = setup_gopro(tiny_backbone)
    module.eval()
    x = images(tiny_backbone, 2)
    with torch.no_grad():
        method.prepare_eval(["cat", "dog", "bird", "fish"], "oxford_pets", "a photo of a {}.")
        logits = method.predict(EvalBatch(labels=torch.tensor([0, 1]), images=x))
        single = method.predict(EvalBatch(labels=torch.tensor([0]), images=x[:1]))
    assert logits.dtype == torch.float32 and logits.shape == (2, 4)
    torch.testing.assert_close(logits[:1], single)  # no batch statistics at test time


def test_gopro_runs_end_to_end(tmp_path, tiny_checkpoint, data_root):
    from test_run import assert_valid, run_args, run_quiet

    results = tmp_path / "results"
    argv = run_args("base2new", tiny_checkpoint, data_root, results, "--method", "gopro", "--dataset",
                    "oxford_pets", "--seeds", "1", "--set", "epochs=1", "warmup_epochs=0", "batch_size=12")
    code, out, err = run_quiet(argv)
    assert code == 0, out + err
    (result,) = [json.loads(p.read_text()) for p in (results / "base2new" / "gopro" / "oxford_pets").glob("*.json")]
    assert_valid(result)
    assert set(result["metrics"]) == {"base", "new"}
    assert result["method"]["recipe"]["model_selection"] == "last_epoch"
