"""2SFS parity: the official `fs.twostage.run_twostage` beside the `twosfs` plugin run by the harness's own
training loop, fp32, CPU, base-to-new.

    python parity/twosfs_parity.py --official /path/to/rethinking_fewshot_vlms

``--official`` is a checkout of FarinaMatteo/rethinking_fewshot_vlms (followed at 64ac143). Both sides
start from the same tiny OpenAI-shaped weights (`parity/tiny_clip.py`). The official `run_twostage`
runs unchanged except for what a CPU needs (`.cuda()` a no-op, its CUDA autocast and GradScaler are
disabled, its `tokenize_texts` puts tokens on the CPU): stage 1 LayerNorm tuning, the
`SingleStreamClassifier` stage 2, selective inference on base and new classes. Budget: n_iters 4,
shots 1 (4 iterations, alpha 0.6: 2 + 2) over a two-batch loader, so both sides see the batches in
the same order (b0 b1 | b0 b1). The plugin side is `benchsuite.engine.train.train` with the plugin's
default recipe and ``iterations=4``.

Printed (relative errors, tolerance 1e-5):
1. the parameters stage 1 trains (names: equal sets or BAD), the first step's logits, loss, every
   gradient and the parameters after it (the first rate is 2e-4 on both sides);
2. with the official code unchanged, the trained parameters and test logits after all 4 steps:
   these differ by design (the official cosine restarts per stage; the harness runs one cosine,
   see the plugin's deviations), printed as INFO;
3. the official run again with its two cosines replaced by the harness's one (the only change): the
   parameters after every step, the classifier's initialisation, the stage-2 logits, loss and
   gradient, and the selective-inference logits on base and on new classes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys
import types
import warnings
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_import import official_runtime, recording_functional  # noqa: E402
from tiny_clip import benchsuite_backbone, make_state_dict, official_model, relative_error, report  # noqa: E402

from benchsuite.engine.recipe import HARNESS_DEFAULTS  # noqa: E402
from benchsuite.engine.train import iteration_lr, train  # noqa: E402
from benchsuite.hookspecs import EvalBatch, LabelSpace, SetupContext  # noqa: E402
from benchsuite.methods import get_method, job_manager  # noqa: E402
from benchsuite.protocols import load_protocol  # noqa: E402

BASE = ["banded", "blotchy", "braided", "bubbly", "bumpy"]
NEW = ["chequered", "cobwebbed", "crystalline", "polka_dotted"]
SIZE = 64
BATCH = 6
N_ITERS, SHOTS, ALPHA, LR, MIN_LR = 4, 1, 0.6, 2e-4, 1e-6


class Recorder:
    """Every optimizer step of any torch optimizer: gradients before, parameters after (by name)."""

    def __init__(self, names: dict[int, str]):
        self.names, self.grads, self.params = names, [], []
        self.handles = []

    def __enter__(self):
        def pre(opt, args, kwargs):
            self.grads.append({self.names[id(p)]: p.grad.detach().clone() for g in opt.param_groups
                               for p in g["params"] if p.grad is not None and id(p) in self.names})

        def post(opt, args, kwargs):
            self.params.append({self.names[id(p)]: p.detach().clone() for g in opt.param_groups
                                for p in g["params"] if id(p) in self.names})

        self.handles = [register_optimizer_step_pre_hook(pre),
                        register_optimizer_step_post_hook(post)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


class HarnessCosine:
    """Stands in for `torch.optim.lr_scheduler.CosineAnnealingLR` in the official run: the harness's
    single per-iteration cosine over the whole budget, whatever T_max the official code asks for."""

    step_count = 0
    total = N_ITERS * SHOTS

    def __init__(self, optimizer, T_max, eta_min=0.0):
        self.optimizer = optimizer
        self._set()

    def _set(self):
        for g in self.optimizer.param_groups:
            g["lr"] = iteration_lr(HarnessCosine.step_count, self.total, LR, MIN_LR)

    def step(self):
        HarnessCosine.step_count += 1
        if HarnessCosine.step_count < self.total:
            self._set()

    def get_last_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]


def official_run(root: Path, state, batches, tests, harness_schedule: bool):
    sys.path.insert(0, str(root))
    for name in ("clip", "fs", "loralib"):
        if name in sys.modules and not str(getattr(sys.modules[name], "__file__", "")).startswith(str(root)):
            raise SystemExit(f"a module {name!r} from elsewhere is imported already; run this script on its own")
    clip = importlib.import_module("clip")
    twostage = importlib.import_module("fs.twostage")
    seen: dict = {"ce": [], "acc": []}
    tokenize = getattr(twostage, "_unpatched_tokenize", twostage.tokenize_texts)
    prepare = getattr(twostage, "_unpatched_prepare", twostage.prepare_for_first_stage)
    twostage._unpatched_tokenize, twostage._unpatched_prepare = tokenize, prepare

    def prepare_and_record(model, args):
        model, params = prepare(model, args)
        seen["trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        seen["optimised"] = sorted(n for n, p in model.named_parameters() if any(p is q for q in params))
        seen["model"] = model
        return model, params

    functional, cls_acc = recording_functional(seen)
    twostage.F, twostage.cls_acc = functional, cls_acc
    twostage.tokenize_texts = lambda template, classnames, device="cpu": tokenize(template, classnames, device="cpu")
    twostage.prepare_for_first_stage = prepare_and_record
    args = types.SimpleNamespace(peft="ln", ln_modality="both", ln_vision_start=0, ln_text_start=0, lr=LR, wd=1e-2,
                                 n_iters=N_ITERS, shots=SHOTS, n_iters_frac=ALPHA, setting="base2new", debug=False,
                                 encoder="both", backbone="ViT-B/16")
    dataset = types.SimpleNamespace(classnames=BASE, template=["a photo of a {}."], test_classnames=BASE,
                                    test_new_classnames=NEW)
    model = official_model(clip.model.build_model, state)
    names = {id(p): n for n, p in model.named_parameters()}
    init = getattr(twostage, "_unpatched_init", twostage.SingleStreamClassifier._init_classifier)
    twostage._unpatched_init = init

    def named_init(self, template, classnames):  # names the stage-2 classifier for the recorder
        init(self, template, classnames)
        names[id(self.classifier)] = "classifier"

    twostage.SingleStreamClassifier._init_classifier = named_init
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR
    HarnessCosine.step_count = 0
    with official_runtime(), warnings.catch_warnings(), Recorder(names) as rec:
        warnings.simplefilter("ignore")
        if harness_schedule:
            torch.optim.lr_scheduler.CosineAnnealingLR = HarnessCosine
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                twostage.run_twostage(args, model, 100, dataset, list(batches), None,
                                      ([tests[0]], [tests[1]]))
        finally:
            torch.optim.lr_scheduler.CosineAnnealingLR = scheduler
    return seen, rec


def plugin_run(state, batches, tests):
    backbone = benchsuite_backbone(state, image_size=SIZE)
    pm, method = job_manager(get_method("twosfs"))
    protocol = load_protocol("base2new")
    recipe = {**HARNESS_DEFAULTS, **pm.hook.recipe(protocol=protocol, dataset="dtd", shots=SHOTS),
              "image_input": "images"}
    assert recipe["iterations"] == 300 * SHOTS, recipe["iterations"]  # the default budget: M = 300 x shots
    recipe["iterations"] = N_ITERS * SHOTS
    module = pm.hook.setup(ctx=SetupContext(backbone=backbone, classnames=BASE, dataset="dtd", template="{} texture.",
                                            recipe=recipe, protocol=protocol, shots=SHOTS, seed=1,
                                            device=torch.device("cpu")))
    names = {id(p): n.removeprefix("clip.") for n, p in module.named_parameters()}
    trainable = sorted(n.removeprefix("clip.") for n, p in module.named_parameters() if p.requires_grad)
    ce: list = []
    original = torch.nn.functional.cross_entropy

    def cross_entropy(logits, target, *a, **k):
        loss = original(logits, target, *a, **k)
        ce.append((logits.detach().clone(), loss.detach().clone()))
        return loss

    twosfs_module = sys.modules[type(method).__module__]
    twosfs_module.F.cross_entropy = cross_entropy
    try:
        with Recorder(names) as rec:
            train(pm, "twosfs", module, list(batches), recipe, method.backbone, "images")
    finally:
        twosfs_module.F.cross_entropy = original
    module.eval()
    logits = []
    with torch.no_grad():
        for classes, (images, labels) in ((BASE, tests[0]), (NEW, tests[1])):
            method.prepare_eval(classes, "dtd", "{} texture.", LabelSpace.of("dtd", BASE, "dtd", classes))
            logits.append(method.predict(EvalBatch(labels=labels, images=images)))
    return {"trainable": trainable, "ce": ce, "logits": logits}, rec


def stacked(d: dict, keys) -> torch.Tensor:
    return torch.cat([d[k].reshape(-1) for k in keys])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path,
                        help="a checkout of FarinaMatteo/rethinking_fewshot_vlms")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.official / "fs" / "twostage.py").is_file():
        raise SystemExit(f"{args.official}: not a rethinking_fewshot_vlms checkout (fs/twostage.py missing)")

    state = make_state_dict(seed=args.seed, image_size=SIZE)
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = [(torch.randn(BATCH, 3, SIZE, SIZE, generator=gen), torch.randint(0, len(BASE), (BATCH,), generator=gen))
               for _ in range(2)]
    tests = [(torch.randn(8, 3, SIZE, SIZE, generator=gen), torch.randint(0, len(c), (8,), generator=gen))
             for c in (BASE, NEW)]
    stage_one = int(N_ITERS * SHOTS * ALPHA)

    mine, mine_rec = plugin_run(state, batches, tests)
    ok = True
    seen, rec = official_run(args.official, state, batches, tests, harness_schedule=False)
    same = set(mine["trainable"]) - {"classifier"} == set(seen["trainable"]) and "classifier" in mine["trainable"]
    print(f"{'OK ' if same else 'BAD'} stage-1 trainable parameters: {len(seen['trainable'])} tensors, "
          f"{sum(state[n].numel() for n in seen['trainable'])} values "
          f"({'equal sets' if same else 'sets differ'}; official optimizer list {len(seen['optimised'])} tensors, "
          f"ln_pre/ln_post/ln_final in it but frozen)")
    ok &= same
    keys = seen["trainable"]
    ok &= report("stage 1, step 1: training logits", mine["ce"][0][0], seen["ce"][0][0])
    ok &= report("stage 1, step 1: loss", mine["ce"][0][1], seen["ce"][0][1])
    ok &= report("stage 1, step 1: LayerNorm gradients", stacked(mine_rec.grads[0], keys), stacked(rec.grads[0], keys))
    ok &= report("stage 1, step 1: LayerNorms after the AdamW step", stacked(mine_rec.params[0], keys),
                 stacked(rec.params[0], keys))
    for what, a, b in (("LayerNorms after stage 1", stacked(mine_rec.params[stage_one - 1], keys),
                        stacked(rec.params[stage_one - 1], keys)),
                       ("classifier after stage 2", mine_rec.params[-1]["classifier"], rec.params[-1]["classifier"]),
                       ("test logits, base classes", mine["logits"][0], seen["acc"][-2]),
                       ("test logits, new classes", mine["logits"][1], seen["acc"][-1])):
        print(f"INFO {what:<39} rel.err {relative_error(a, b):.2e} (the official cosine restarts per stage: "
              f"differs by design)")

    seen, rec = official_run(args.official, state, batches, tests, harness_schedule=True)
    for step in range(N_ITERS * SHOTS):
        stage = 1 if step < stage_one else 2
        names = keys if stage == 1 else ["classifier"]
        ok &= report(f"same schedule, stage {stage}, step {step + 1}: parameters after it",
                     stacked(mine_rec.params[step], names), stacked(rec.params[step], names))
    ok &= report("same schedule: stage-2 first logits (classifier init)", mine["ce"][stage_one][0],
                 seen["ce"][stage_one][0])
    ok &= report("same schedule: stage-2 first loss", mine["ce"][stage_one][1], seen["ce"][stage_one][1])
    ok &= report("same schedule: stage-2 first classifier gradient", mine_rec.grads[stage_one]["classifier"],
                 rec.grads[stage_one]["classifier"])
    ok &= report("same schedule: selective inference, base (classifier)", mine["logits"][0], seen["acc"][-2])
    ok &= report("same schedule: selective inference, new (text encoder)", mine["logits"][1], seen["acc"][-1])
    print("parity OK" if ok else "parity FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
