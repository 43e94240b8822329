"""LP++ parity: the official `methods/linear_probe_p2.py` solver beside the `lp_pp` plugin, fp32, CPU.

    python parity/lp_pp_parity.py --official /path/to/FewShot-CLIP-Strong-Baseline

The official ``LinearProbe_P2.forward`` runs unchanged on a tiny OpenAI-shaped CLIP (its own ``clip``
package, `parity/tiny_clip.py` weights): it encodes the training and validation batches itself,
initialises, and trains 300 full-batch steps. The plugin gets the benchsuite backbone's features of
the same images through its ``fit_features`` hook. Both draw the probe's default initialisation
(its bias survives in LP++) under the same seed. The official values are observed, not changed, by
recording what it passes to ``nn.Linear``, ``torch.optim.SGD``, ``Variable`` and
``F.cross_entropy`` (arguments, and parameter copies before the first and after chosen steps).

Printed as relative errors (tolerance 1e-5): image features, the text classifier
(``utils.clip_classifier``), the step sizes lr_w and lr_alpha, the initial probe weight, bias and
alpha, the training logits and loss at step 0, the probe after the first SGD step, alpha after its
first update (step 10), the loss over all 300 steps, the final probe and alpha, and test logits of the
final model (the official classifier module and alpha with the official expression
``vision + ones @ alpha * text``).

Shims while the official code runs: the ``methods`` package is entered without its ``__init__`` (which
imports every method, scikit-learn included); ``.cuda()`` is a no-op (`official_import.official_runtime`);
``methods.utils.get_one_hot`` builds its one-hot matrix in fp16 (the official run's feature dtype on
GPU) and ``bmm`` refuses fp16 x fp32, so its result is cast to fp32 (0/1 entries: exact); its
``print`` output is silenced.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_import import official_runtime  # noqa: E402
from tiny_clip import benchsuite_backbone, make_state_dict, official_model, plugin_setup, report  # noqa: E402

from benchsuite.hookspecs import EvalBatch  # noqa: E402
from benchsuite_plugins.lp_plus_plus import solve, step_size_alpha, step_size_w  # noqa: E402

CLASSNAMES = ["accordion", "airplane", "anchor", "barrel", "bonsai"]
TEMPLATE = "a photo of a {}."
SIZE = 64
SHOTS = 4
STEPS = 300


class Recorder:
    """What the official solver hands to the library calls it makes (observed, not changed)."""

    def __init__(self) -> None:
        self.linear = None
        self.lr_w = None
        self.init: dict[str, torch.Tensor] = {}
        self.after_step: dict[int, dict[str, torch.Tensor]] = {}
        self.alpha = None
        self.losses: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []

    def install(self, lp):
        rec, nn_module, sgd = self, lp.nn, torch.optim.SGD

        class Linear(nn_module.Linear):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                rec.linear = self

        class SGD(sgd):
            def __init__(self, params, lr, *a, **k):
                params = list(params)
                rec.lr_w = float(lr)
                rec.init.update(weight=params[0].detach().clone(), bias=params[1].detach().clone())
                super().__init__(params, lr, *a, **k)
                self.calls = 0

            def step(self, *a, **k):
                out = super().step(*a, **k)
                self.calls += 1
                rec.after_step[self.calls] = {"weight": rec.linear.weight.detach().clone(),
                                              "bias": rec.linear.bias.detach().clone(),
                                              "alpha": rec.alpha.detach().clone()}
                return out

        def variable(tensor, requires_grad=False):
            rec.alpha = tensor.detach().clone().requires_grad_(requires_grad)
            rec.init["alpha"] = tensor.detach().clone()
            return rec.alpha

        def cross_entropy(logits, labels, *a, **k):
            loss = F.cross_entropy(logits, labels, *a, **k)
            rec.logits.append(logits.detach().clone())
            rec.losses.append(loss.detach().clone())
            return loss

        lp.nn = types.SimpleNamespace(**{**vars(nn_module), "Linear": Linear})
        lp.F = types.SimpleNamespace(**{**vars(F), "cross_entropy": cross_entropy})
        lp.Variable = variable
        torch.optim.SGD = SGD
        return lambda: setattr(torch.optim, "SGD", sgd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path,
                        help="clone of FereshteShakeri/FewShot-CLIP-Strong-Baseline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = args.official.resolve()
    if not (root / "methods" / "linear_probe_p2.py").is_file():
        raise SystemExit(f"{root}/methods/linear_probe_p2.py: not found; pass a clone of the official repository")
    sys.path.insert(0, str(root))
    package = types.ModuleType("methods")  # its __init__ imports every method (sklearn, ...): not run
    package.__path__ = [str(root / "methods")]
    sys.modules["methods"] = package
    with contextlib.redirect_stdout(io.StringIO()):
        clip = importlib.import_module("clip")
        lp = importlib.import_module("methods.linear_probe_p2")
        mutils = importlib.import_module("methods.utils")
        root_utils = importlib.import_module("utils")
    one_hot = mutils.get_one_hot
    mutils.get_one_hot = lambda y_s, num_classes: one_hot(y_s, num_classes).float()  # fp16 there; exact cast

    state = make_state_dict(seed=args.seed, image_size=SIZE)
    ref_clip = official_model(clip.model.build_model, state)
    backbone = benchsuite_backbone(state, image_size=SIZE)

    gen = torch.Generator().manual_seed(args.seed + 1)
    n = SHOTS * len(CLASSNAMES)
    train_images = torch.randn(n, 3, SIZE, SIZE, generator=gen)
    train_labels = torch.arange(len(CLASSNAMES)).repeat_interleave(SHOTS)
    val_images = torch.randn(n, 3, SIZE, SIZE, generator=gen)
    test_images = torch.randn(12, 3, SIZE, SIZE, generator=gen)
    test_labels = torch.randint(0, len(CLASSNAMES), (12,), generator=gen)

    ok = True
    with torch.no_grad(), official_runtime(), contextlib.redirect_stdout(io.StringIO()):
        ref_text = root_utils.clip_classifier(CLASSNAMES, [TEMPLATE], ref_clip)  # [D, C]
        ref_features = ref_clip.encode_image(train_images)
        ref_test = F.normalize(ref_clip.encode_image(test_images), dim=-1)
    with torch.no_grad():
        features = backbone.encode_image(train_images)
        test_features = backbone.encode_image(test_images)
    ok &= report("image features (frozen encoder)", features, ref_features)

    rec = Recorder()
    restore = rec.install(lp)
    official = lp.LinearProbe_P2({"train_epoch": STEPS, "shots": SHOTS, "dataset": "caltech101",
                                  "output_dir": tempfile.mkdtemp(prefix="bs-lp-pp-parity-")})
    try:
        torch.manual_seed(args.seed)
        with official_runtime(), contextlib.redirect_stdout(io.StringIO()):
            official(train_loader=[(train_images, train_labels)], val_loader=[(val_images, train_labels)],
                     test_features=ref_test, test_labels=test_labels, text_weights=ref_text, model=ref_clip,
                     classnames=CLASSNAMES)
    finally:
        restore()

    torch.manual_seed(args.seed)
    method, module, recipe = plugin_setup("lp_pp", backbone, CLASSNAMES, dataset="caltech101", template=TEMPLATE,
                                          seed=args.seed)
    ok &= report("text classifier (clip_classifier)", method.train_text, ref_text.t())
    normed = F.normalize(features, dim=-1)
    text = method.train_text
    ok &= report("lr_w = 4N / lambda_max(F^T F)", torch.tensor(step_size_w(normed)), torch.tensor(rec.lr_w))
    ok &= report("lr_alpha = N / (4 max_c sum_n (f.t_c)^2)", torch.tensor(step_size_alpha(normed @ text.t())),
                 torch.as_tensor(official.lr_alpha))

    def solved(steps: int):
        model = copy.deepcopy(module)
        with torch.enable_grad():
            losses = solve(model, normed, train_labels, text, steps=steps, alpha_every=10, alpha_scale=250.0)
        return model, losses

    start, _ = solved(0)
    ok &= report("initial probe weight (class feature sums)", start.probe.weight, rec.init["weight"])
    ok &= report("initial probe bias (default init, same seed)", start.probe.bias, rec.init["bias"])
    ok &= report("initial alpha (250 * mean own-class cos)", start.alpha, rec.init["alpha"].reshape(-1))
    with torch.no_grad():
        logits0 = start.logits(normed, text)
    ok &= report("training logits at step 0", logits0, rec.logits[0])
    ok &= report("training loss at step 0", F.cross_entropy(logits0, train_labels), rec.losses[0])
    one, _ = solved(1)
    ok &= report("probe weight after the first SGD step", one.probe.weight, rec.after_step[1]["weight"])
    ok &= report("probe bias after the first SGD step", one.probe.bias, rec.after_step[1]["bias"])
    ten, _ = solved(10)
    ok &= report("alpha after its first update (step 10)", ten.alpha, rec.after_step[11]["alpha"].reshape(-1))

    method.fit_features(features=features[None], labels=train_labels)
    ok &= report(f"loss at every one of the {STEPS} steps", torch.tensor(method.losses), torch.stack(rec.losses))
    ok &= report(f"probe weight after {STEPS} steps", module.probe.weight, rec.linear.weight)
    ok &= report(f"probe bias after {STEPS} steps", module.probe.bias, rec.linear.bias)
    ok &= report(f"alpha after {STEPS} steps", module.alpha, rec.alpha.reshape(-1))
    with torch.no_grad():
        ref_logits = rec.linear(ref_test) + torch.ones(ref_test.shape[0], 1) @ rec.alpha * (ref_test @ ref_text)
        from benchsuite.hookspecs import LabelSpace

        space = LabelSpace.of("caltech101", CLASSNAMES, "caltech101", CLASSNAMES)
        method.prepare_eval(CLASSNAMES, "caltech101", TEMPLATE, space)
        logits = method.predict(EvalBatch(labels=test_labels, image_features=test_features))
    ok &= report("test logits of the final model", logits, ref_logits)
    print(f"    step sizes: lr_w {rec.lr_w:.6g}, lr_alpha {float(official.lr_alpha):.6g}; "
          f"loss {float(rec.losses[0]):.4f} -> {float(rec.losses[-1]):.4f}; "
          f"alpha {rec.init['alpha'].reshape(-1).tolist()[:3]} -> {rec.alpha.reshape(-1).tolist()[:3]} (first 3)")
    print("parity OK" if ok else "parity FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
