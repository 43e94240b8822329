"""Tip-Adapter / Tip-Adapter-F parity: the official ``utils.py`` and ``main.py`` beside the plugins, fp32, CPU.

    python parity/tip_adapter_parity.py --official /path/to/Tip-Adapter     # gaopengcuhk/Tip-Adapter

Both sides use the same tiny OpenAI-shaped weights (`parity/tiny_clip.py`): the official
``clip_classifier`` encodes the class prompts with the official ``clip.model.build_model`` on them,
the plugin with benchsuite's backbone. The image side is the frozen encoder's features of augmented
views, which the harness computes (``fit_features``); here both sides get the same feature tensors (a
fake ``clip_model.encode_image`` returns them to the official ``build_cache_model`` view by view).

The official ``cls_acc`` converts a one-element array with ``float()``, which numpy 2.x refuses; the
script replaces it by the same computation with ``.item()`` (its only change to official code).

Printed (relative errors, tolerance 1e-5): the zero-shot classifier, the cache keys, the Tip-Adapter
test logits at the config's init (beta, alpha), the searched (beta, alpha) on a validation set (equal,
or the script fails), the test logits at the searched values, and for Tip-Adapter-F the first step:
its loss, the keys' gradient and the keys after one AdamW step (lr 0.001, eps 1e-4, weight decay 0.01;
the official loop's optimizer against the harness's `make_optimizer` from the plugin's recipe).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_import import official_runtime, stub_module  # noqa: E402
from tiny_clip import benchsuite_backbone, make_state_dict, official_model, plugin_setup, report  # noqa: E402

from benchsuite.engine.train import make_optimizer, parameter_groups  # noqa: E402
from benchsuite.hookspecs import EvalBatch, LabelSpace, TrainBatch  # noqa: E402

CLASSNAMES = ["banded", "blotchy", "braided", "bubbly", "bumpy", "chequered"]
TEMPLATE = "{} texture."
SIZE, SHOTS, VIEWS = 64, 4, 3


def _load_official(root: Path):
    root = root.resolve()
    if not (root / "utils.py").is_file():
        raise SystemExit(f"{root}: no utils.py; pass --official <clone of gaopengcuhk/Tip-Adapter>")
    sys.path.insert(0, str(root))
    stub_module("gdown")  # datasets/utils.py imports it for downloads the parity never makes
    import clip  # the repository's own package
    import utils  # noqa: F401  (the repository's utils.py)
    import main as official_main  # the repository's main.py: run_tip_adapter_F
    utils = sys.modules["utils"]
    official_cls_acc = utils.cls_acc

    def cls_acc(output, target, topk=1):
        """The official function, its ``float(<1-element array>)`` (refused by numpy 2.x) taken as
        ``.item()``: the same accuracy."""
        pred = output.topk(topk, 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return 100 * float(correct[:topk].reshape(-1).float().sum().item()) / target.shape[0]

    cls_acc.__doc__ += f" (replaces {official_cls_acc.__qualname__})"
    utils.cls_acc = official_main.cls_acc = cls_acc
    return clip, utils, official_main


class _FakeCLIP:
    """What the official functions call on ``clip_model``: ``encode_text`` (the official model on the
    same weights) and ``encode_image``, which returns the given feature tensors in turn."""

    def __init__(self, model, image_features: list[torch.Tensor]):
        self.model, self.queue, self.dtype = model, list(image_features), torch.float32

    def encode_text(self, tokens):
        return self.model.encode_text(tokens)

    def encode_image(self, images):
        return self.queue.pop(0).clone()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path, help="a clone of gaopengcuhk/Tip-Adapter")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    clip, utils, official_main = _load_official(args.official)

    state = make_state_dict(seed=args.seed, image_size=SIZE)
    backbone = benchsuite_backbone(state, image_size=SIZE)
    official = official_model(clip.model.build_model, state)
    torch.manual_seed(args.seed)
    n = SHOTS * len(CLASSNAMES)
    dim = backbone.embed_dim
    views = torch.randn(VIEWS, n, dim)
    labels = torch.arange(len(CLASSNAMES)).repeat_interleave(SHOTS)
    # validation features near the cache's (so that the searched values matter) with noise
    val, val_labels = views.mean(0)[::2] + 1.5 * torch.randn(n // 2, dim), labels[::2]
    test = F.normalize(torch.randn(10, dim), dim=-1)
    ok = True

    with official_runtime():
        weights = utils.clip_classifier(CLASSNAMES, [TEMPLATE], official)  # [D, C]
        cfg = {"load_cache": False, "augment_epoch": VIEWS, "cache_dir": tempfile.mkdtemp(), "shots": SHOTS,
               "search_hp": True, "search_scale": [13, 13], "search_step": [200, 20], "init_beta": 1.0,
               "init_alpha": 2.0, "lr": 0.001, "train_epoch": 1}
        loader = [(torch.zeros(n, 3, SIZE, SIZE), labels)]
        keys, values = utils.build_cache_model(cfg, _FakeCLIP(official, list(views)), loader)
        values = values.float()
        official_search = utils.search_hp(cfg, keys, values, F.normalize(val, dim=-1), val_labels, weights)

    method, module, recipe = plugin_setup("tip_adapter", backbone, CLASSNAMES, dataset="dtd", template=TEMPLATE)
    method.fit_features(views, labels, val, val_labels)
    space = LabelSpace.of("dtd", CLASSNAMES, "dtd", CLASSNAMES)
    ok &= report("zero-shot classifier", method.zero_shot_weights(CLASSNAMES, TEMPLATE), weights.t())
    ok &= report("cache keys", method.keys, keys.t())
    init = 100.0 * test @ weights + 2.0 * ((-1) * (1.0 - 1.0 * (test @ keys))).exp() @ values
    method.beta, method.alpha = 1.0, 2.0
    method.prepare_eval(CLASSNAMES, "dtd", TEMPLATE, space)
    ok &= report("test logits at init (beta 1, alpha 2)", method.predict(EvalBatch(labels=labels[:10],
                                                                                    image_features=test)), init)
    method.search(val, val_labels)
    same = (method.beta, method.alpha) == tuple(official_search)
    print(f"{'OK ' if same else 'BAD'} searched (beta, alpha)                  plugin {method.beta:.4f}, "
          f"{method.alpha:.4f}; official {official_search[0]:.4f}, {official_search[1]:.4f}")
    ok &= same
    best_beta, best_alpha = official_search
    searched = 100.0 * test @ weights + best_alpha * ((-1) * (best_beta - best_beta * (test @ keys))).exp() @ values
    method.prepare_eval(CLASSNAMES, "dtd", TEMPLATE, space)
    ok &= report("test logits at the searched values", method.predict(EvalBatch(labels=labels[:10],
                                                                                 image_features=test)), searched)

    # Tip-Adapter-F: one step of the official loop (its AdamW, one batch) against the plugin's step
    batch = torch.randn(n, dim)
    recorded = {}
    real_adamw = torch.optim.AdamW

    class RecordingAdamW(real_adamw):
        def step(self, closure=None):
            weight = self.param_groups[0]["params"][0]
            recorded.setdefault("grad", weight.grad.detach().clone())
            out = super().step(closure)
            recorded.setdefault("after", weight.detach().clone())
            return out

    official_main.torch.optim.AdamW = RecordingAdamW
    original_ce = official_main.F.cross_entropy

    def recording_ce(logits, target):
        loss = original_ce(logits, target)
        recorded.setdefault("loss", loss.detach().clone())
        return loss

    official_main.F.cross_entropy = recording_ce
    try:
        with official_runtime():
            fake = _FakeCLIP(official, [batch])
            official_main.run_tip_adapter_F(cfg, keys.clone(), values, F.normalize(val, dim=-1), val_labels, test,
                                            labels[:10], weights, fake, [(torch.zeros(n, 3, SIZE, SIZE), labels)])
    finally:
        official_main.torch.optim.AdamW, official_main.F.cross_entropy = real_adamw, original_ce

    method_f, module_f, recipe_f = plugin_setup("tip_adapter_f", backbone, CLASSNAMES, dataset="dtd",
                                                template=TEMPLATE)
    method_f.fit_features(views, labels, val, val_labels)
    import pluggy

    from benchsuite.hookspecs import PROJECT, MethodSpec
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(MethodSpec)
    optimizer = make_optimizer(parameter_groups(pm, "tip_adapter_f", module_f, recipe_f), recipe_f)
    # the official cosine is stepped after the update: the first step runs at the base rate
    out = method_f.train_step(TrainBatch(images=torch.zeros(n), labels=labels, image_features=batch), 0)
    optimizer.zero_grad()
    out["loss"].backward()
    grad = module_f.weight.grad.detach().clone()
    optimizer.step()
    ok &= report("Tip-Adapter-F loss (first batch)", out["loss"], recorded["loss"])
    ok &= report("Tip-Adapter-F keys' gradient", grad, recorded["grad"])
    ok &= report("Tip-Adapter-F keys after one AdamW step", module_f.weight.detach(), recorded["after"])
    print("parity:", "all within tolerance" if ok else "DIFFERENCES above tolerance")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
