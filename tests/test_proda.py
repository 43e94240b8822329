"""ProDA (methods.md 4.9): the surrogate logits (zero variance gives the plain logits; the
covariance form checked element by element), the one batched text-encoder call per step, mixed
class-token positions, the seeded prompt order, the diversity term, the mean-prompt classifier,
the trainable-parameter count on ViT-B-16 shapes and a short CLI run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from benchsuite.clip.backbone import load_backbone
from benchsuite.errors import BenchsuiteError
from benchsuite.hookspecs import EvalBatch, SetupContext, TrainBatch
from benchsuite.protocols import load_protocol
from benchsuite_plugins.proda import ProDA, diversity, mixed_positions, surrogate_logits
from test_run import result_files, run_args, run_quiet

CLASSNAMES = ["golden_retriever", "cat", "sea lion"]


def make(backbone, classnames=CLASSNAMES, seed=1, **overrides) -> tuple[ProDA, torch.nn.Module]:
    method = ProDA()
    protocol = load_protocol("base2new")
    recipe = {**method.recipe(protocol, "oxford_pets", 16), **overrides}
    ctx = SetupContext(backbone=backbone, classnames=classnames, dataset="oxford_pets", template="a photo of a {}.",
                       recipe=recipe, protocol=protocol, shots=16, seed=seed, device=torch.device("cpu"))
    torch.manual_seed(0)
    return method, method.setup(ctx)


def batch(backbone, n=6, n_cls=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TrainBatch(images=torch.zeros(n, 3, 1, 1), labels=torch.arange(n) % n_cls,
                      image_features=torch.randn(n, backbone.embed_dim, generator=g))


# --------------------------------------------------------------------------------------------------
# the surrogate


def test_zero_variance_gives_the_plain_logits():
    torch.manual_seed(0)
    z = F.normalize(torch.randn(5, 8), dim=-1)
    w = F.normalize(torch.randn(4, 8), dim=-1)
    labels = torch.tensor([0, 1, 2, 3, 0])
    same = w.unsqueeze(0).expand(3, -1, -1)                      # P = 3 identical prompts
    torch.testing.assert_close(surrogate_logits(z, same, labels, torch.tensor(100.0)), 100.0 * z @ w.t())


def test_surrogate_matches_the_covariance_formula_element_by_element():
    torch.manual_seed(1)
    p, c, e, b = 4, 3, 5, 2
    w = F.normalize(torch.randn(p, c, e), dim=-1)
    z = F.normalize(torch.randn(b, e), dim=-1)
    labels = torch.tensor([2, 0])
    s = 7.0
    mu = w.mean(0)
    expected = torch.zeros(b, c)
    for i in range(b):
        y = int(labels[i])
        for j in range(c):
            var = 0.0
            for d in range(e):  # Sigma^d_ik = (1/P) sum_p (w_ip - mu_i)(w_kp - mu_k) in dimension d
                cov = lambda u, v: float(((w[:, u, d] - mu[u, d]) * (w[:, v, d] - mu[v, d])).sum()) / p
                var += float(z[i, d]) ** 2 * (cov(y, y) + cov(j, j) - 2 * cov(y, j))
            expected[i, j] = s * float(z[i] @ mu[j]) + 0.5 * s * s * var
    got = surrogate_logits(z, w, labels, torch.tensor(s))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(got.gather(1, labels[:, None]).squeeze(1),
                          s * (z * mu[labels]).sum(-1))           # the label's own logit has no variance term
    plain = s * z @ mu.t()
    assert bool((got >= plain - 1e-6).all())                     # the bound only raises the other classes


def test_model_with_identical_prompts_trains_on_the_plain_mean_classifier(tiny_backbone):
    method, model = make(tiny_backbone, n_prompts=2, prompt_batch=2, alpha=0.0)  # K = 2: both "end"
    model.ctx.data[1] = model.ctx.data[0]
    b = batch(tiny_backbone)
    out = method.train_step(b, 0)
    with torch.no_grad():
        w = F.normalize(model.prompts.encode(model.ctx[0]), dim=-1)
        plain = tiny_backbone.logit_scale * F.normalize(b.image_features, dim=-1) @ w.t()
    torch.testing.assert_close(out["ce_loss"], F.cross_entropy(plain, b.labels), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# prompts: positions, one batched call, order, diversity, inference


def test_mixed_positions():
    assert mixed_positions(32) == ["front"] * 8 + ["middle"] * 8 + ["end"] * 16
    assert mixed_positions(1) == ["end"]


def test_one_batched_text_encoder_call_per_step_and_its_features(tiny_backbone, monkeypatch):
    method, model = make(tiny_backbone, n_prompts=8, prompt_batch=4)
    idx = torch.tensor([0, 2, 5, 7])                              # front, middle, end, end
    with torch.no_grad():
        feats, bare = model.train_features(idx)
        positions = [model.positions[i] for i in idx.tolist()]
        expected = model.prompts.encode(model.ctx[idx], groups=True, position=positions)
        expected_bare = model.bare.encode(model.ctx, groups=True, position=model.positions)[:, 0]
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(bare, expected_bare, atol=1e-5, rtol=0)

    calls = []
    original = type(tiny_backbone).encode_embeddings

    def counting(self, embeddings, eot, **kw):
        calls.append(embeddings.shape[0])
        return original(self, embeddings, eot, **kw)

    monkeypatch.setattr(type(tiny_backbone), "encode_embeddings", counting)
    method.train_step(batch(tiny_backbone), 0)
    assert calls == [4 * len(CLASSNAMES) + 8]                     # P x C class prompts + K class-free, one call


def test_prompt_order_is_a_seeded_permutation_in_chunks(tiny_backbone):
    a, _ = make(tiny_backbone, n_prompts=8, prompt_batch=2, seed=3)
    b, _ = make(tiny_backbone, n_prompts=8, prompt_batch=2, seed=3)
    c, _ = make(tiny_backbone, n_prompts=8, prompt_batch=2, seed=4)
    run = lambda m: [m.next_prompts().tolist() for _ in range(8)]
    ra, rb, rc = run(a), run(b), run(c)
    assert ra == rb and ra != rc
    for epoch in (ra[:4], ra[4:]):                                 # K / P = 4 steps visit every prompt once
        assert sorted(i for chunk in epoch for i in chunk) == list(range(8))


def test_prompt_order_resumes_from_its_training_state(tiny_backbone, tmp_path):
    """Generator state and the rest of the permutation go through a weights-only checkpoint file:
    a fresh instance loading them draws what the uninterrupted one draws (mid-permutation too)."""
    a, _ = make(tiny_backbone, n_prompts=8, prompt_batch=2, seed=3)
    for _ in range(5):  # one whole permutation and one chunk of the next
        a.next_prompts()
    torch.save(a.training_state(), tmp_path / "state.pt")
    b, _ = make(tiny_backbone, n_prompts=8, prompt_batch=2, seed=3)
    b.load_training_state(torch.load(tmp_path / "state.pt", weights_only=True))
    assert [b.next_prompts().tolist() for _ in range(7)] == [a.next_prompts().tolist() for _ in range(7)]


def test_prompt_batch_must_divide_the_prompts(tiny_backbone):
    with pytest.raises(BenchsuiteError, match="prompt_batch=5 must be >= 1 and divide n_prompts=32"):
        make(tiny_backbone, prompt_batch=5)


def test_diversity_term():
    assert float(diversity(torch.eye(4))) == pytest.approx(0.0)
    assert float(diversity(torch.ones(3, 5))) == pytest.approx(1.0)
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])                  # |cos| = 1/sqrt(2), both orders
    assert float(diversity(g)) == pytest.approx(2 ** -0.5)


def test_loss_adds_alpha_times_diversity_and_reaches_every_prompt(tiny_backbone):
    method, model = make(tiny_backbone, n_prompts=8, prompt_batch=4, alpha=0.1)
    out = method.train_step(batch(tiny_backbone), 0)
    torch.testing.assert_close(out["loss"], out["ce_loss"] + 0.1 * out["div_loss"])
    out["loss"].backward()
    assert bool((model.ctx.grad.flatten(1).abs().sum(1) > 0).all())  # diversity reaches the unsampled prompts


def test_inference_is_the_mean_of_the_normalised_prompt_features(tiny_backbone):
    method, model = make(tiny_backbone, n_prompts=4, prompt_batch=2)
    new = ["airplane_cabin", "dog"]
    with torch.no_grad():
        method.prepare_eval(new, "oxford_pets", "a photo of a {}.")
        per_prompt = [F.normalize(model.prompts.encode(model.ctx[k], position=model.positions[k]), dim=-1)
                      for k in range(4)]
        mean = torch.stack(per_prompt).mean(0)
        feats = torch.randn(3, tiny_backbone.embed_dim)
        logits = method.predict(EvalBatch(labels=torch.zeros(3, dtype=torch.long), image_features=feats))
    torch.testing.assert_close(method.text_features, mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, tiny_backbone.logit_scale * F.normalize(feats, dim=-1) @ mean.t())
    assert logits.dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# real shapes and end to end


@pytest.fixture(scope="module")
def vit_b16():
    return load_backbone("ViT-B-16", "none", precision="fp32", device="cpu")


def test_trainable_parameters_on_vit_b16(vit_b16):
    _, model = make(vit_b16)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 32 * 16 * 512  # 262,144


def test_cli_run_on_base2new(tmp_path, tiny_checkpoint, data_root):
    results = tmp_path / "results"
    code, out, err = run_quiet(run_args("base2new", tiny_checkpoint, data_root, results, "--method", "proda",
                                        "--dataset", "oxford_pets", "--seeds", "1", "--set", "epochs=2", "--quiet"))
    assert code == 0, out + err
    [path] = result_files(results)
    result = json.loads(path.read_text())
    assert result["job"]["method"] == "proda"
    assert result["method"]["recipe"]["n_prompts"] == 32 and result["method"]["recipe"]["epochs"] == 2
