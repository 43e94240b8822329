"""CLIP-LoRA parity: the official `lora.run_lora` training loop beside the `clip_lora` plugin run by the
harness's own training loop, fp32, CPU.

    python parity/clip_lora_parity.py --official /path/to/CLIP-LoRA

``--official`` is a checkout of MaxZanella/CLIP-LoRA (followed at 358f0d7). Both sides start from the
same tiny OpenAI-shaped weights (`parity/tiny_clip.py`): the official `clip.model.build_model` plus its
`loralib.apply_lora` (r 2, alpha 1, dropout 0.25, q/k/v of every block of both towers), and
benchsuite's backbone plus `benchsuite.clip.lora` through the plugin's `setup`. The LoRA matrices are
set to the same values on both sides (B non-zero, so the adapters matter from the first step), and
the dropout of every LoRA branch draws the same mask on both sides (one mask per tower, block,
projection and input shape, applied in each side's tensor layout: official [L, N, D], benchsuite
[N, L, D] cut after the longest EOT), which checks where dropout sits and how it is scaled.

The official `run_lora` runs unchanged (`.cuda()` is a no-op, its CUDA autocast and GradScaler are
disabled on a CPU): its zero-shot prints, its AdamW (lr 2e-4, weight decay 1e-2), its per-iteration
cosine (eta_min 1e-6), its loop over a one- or two-batch loader, its final test evaluation on merged
weights. The plugin side is `benchsuite.engine.train.train` with the plugin's default recipe and an
iteration budget of 1, then 2 (the official budget `n_iters * shots` with n_iters 1, shots 1 and 2).
Printed, as relative errors (tolerance 1e-5): training logits and loss of the first step, the
gradient of every LoRA matrix, the LoRA matrices after the first step, the test logits after it, and
the LoRA matrices and test logits after two steps (second batch, cosine-decayed rate).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types
import warnings
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_import import official_runtime, recording_functional  # noqa: E402
from tiny_clip import benchsuite_backbone, make_state_dict, official_model, report  # noqa: E402

from benchsuite.clip.lora import ExplicitAttention  # noqa: E402
from benchsuite.engine.recipe import HARNESS_DEFAULTS  # noqa: E402
from benchsuite.engine.train import train  # noqa: E402
from benchsuite.hookspecs import EvalBatch, SetupContext  # noqa: E402
from benchsuite.methods import get_method, job_manager  # noqa: E402
from benchsuite.protocols import load_protocol  # noqa: E402

CLASSNAMES = ["annual_crop", "forest", "herbaceous vegetation", "highway", "industrial", "pasture", "river"]
SIZE = 64
BATCH = 6
TEXT_LENGTH = 77
VISION_LENGTH = 1 + (SIZE // 16) ** 2
TARGETS = ("q", "k", "v")


class MaskBank:
    """One fixed dropout mask per (tower, block, projection, rows): Bernoulli(1 - p) / (1 - p) in the
    [rows, full length, width] layout, drawn from a generator seeded by the key, so both sides get the
    same mask whatever order they ask in."""

    def __init__(self, p: float, seed: int):
        self.p, self.seed, self.masks = p, seed, {}

    def get(self, key: tuple, rows: int, length: int, width: int) -> torch.Tensor:
        full = (*key, rows, length, width)
        if full not in self.masks:
            gen = torch.Generator().manual_seed(self.seed + zlib.crc32(repr(full).encode()))
            keep = torch.rand(rows, length, width, generator=gen) >= self.p
            self.masks[full] = keep.float() / (1.0 - self.p)
        return self.masks[full]


class FixedDropout(torch.nn.Module):
    """Dropout with the bank's mask; ``layout`` "LND" (official CLIP) or "NLD" (open_clip, batch first).
    Identity in eval mode, as nn.Dropout. ``p`` is read by the official LinearLoRA."""

    def __init__(self, bank: MaskBank, key: tuple, full_length: int, layout: str):
        super().__init__()
        self.bank, self.key, self.full_length, self.layout = bank, key, full_length, layout
        self.p = bank.p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if self.layout == "LND":
            length, rows, width = x.shape
            mask = self.bank.get(self.key, rows, self.full_length, width)[:, :length].transpose(0, 1)
        else:
            rows, length, width = x.shape
            mask = self.bank.get(self.key, rows, self.full_length, width)[:, :length]
        return x * mask


def lora_values(seed: int, r: int, width: dict[str, int], layers: int) -> dict[tuple, tuple]:
    """(A, B) per (tower, block, projection): A as Kaiming-uniform would draw it, B small non-zero."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for tower in ("text", "vision"):
        w = width[tower]
        bound = 1.0 / w ** 0.5
        for block in range(layers):
            for target in TARGETS:
                a = (torch.rand(r, w, generator=gen) * 2 - 1) * bound
                b = 0.05 * torch.randn(w, r, generator=gen)
                out[(tower, block, target)] = (a, b)
    return out


def official_lora_layers(model) -> list[tuple[tuple, torch.nn.Module]]:
    """((tower, block, target), LinearLoRA) of the official adapted model."""
    found = []
    for tower, transformer in (("text", model.transformer), ("vision", model.visual.transformer)):
        for block, res in enumerate(transformer.resblocks):
            for target in TARGETS:
                found.append(((tower, block, target), getattr(res.attn, f"{target}_proj")))
    return found


def plugin_lora_layers(model) -> list[tuple[tuple, torch.nn.Module]]:
    found = []
    for tower, transformer in (("text", model.transformer), ("vision", model.visual.transformer)):
        for block, res in enumerate(transformer.resblocks):
            assert isinstance(res.attn, ExplicitAttention)
            for target in TARGETS:
                found.append(((tower, block, target), res.attn.lora[target]))
    return found


def run_official(root: Path, state, values, bank, batches, test):
    """One official `run_lora` over `batches` (n_iters 1, shots len(batches)); returns what it saw."""
    sys.path.insert(0, str(root))
    for name in ("clip", "utils", "lora", "loralib"):
        if name in sys.modules and not str(getattr(sys.modules[name], "__file__", "")).startswith(str(root)):
            raise SystemExit(f"a module {name!r} from elsewhere is imported already; run this script on its own")
    clip = importlib.import_module("clip")
    lora = importlib.import_module("lora")
    seen: dict[str, list] = {"ce": [], "acc": []}
    apply_lora = getattr(lora, "_unpatched_apply_lora", lora.apply_lora)
    lora._unpatched_apply_lora = apply_lora

    def apply_and_fix(args, model):
        layers = apply_lora(args, model)
        for key, linear in official_lora_layers(model):
            a, b = values[key]
            linear.w_lora_A.data.copy_(a)
            linear.w_lora_B.data.copy_(b)
            linear.dropout = FixedDropout(bank, key, TEXT_LENGTH if key[0] == "text" else VISION_LENGTH, "LND")
        seen["model"] = model
        return layers

    functional, cls_acc = recording_functional(seen)
    lora.apply_lora, lora.F, lora.cls_acc = apply_and_fix, functional, cls_acc
    lora.tqdm = lambda x, *a, **k: x
    args = types.SimpleNamespace(encoder="both", position="all", params=list(TARGETS), r=2, alpha=1,
                                 dropout_rate=0.25, backbone="ViT-B/16", lr=2e-4, n_iters=1, shots=len(batches),
                                 eval_only=False, save_path=None, filename="lora_weights")
    dataset = types.SimpleNamespace(classnames=CLASSNAMES, template=["a photo of a {}."])
    model = official_model(clip.model.build_model, state)
    with official_runtime(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            lora.run_lora(args, model, 100, dataset, list(batches), [test], [test])
    layers = dict(official_lora_layers(seen["model"]))
    return {"logits": seen["ce"][0][0], "loss": seen["ce"][0][1], "test": seen["acc"][-1],
            "A": {k: m.w_lora_A.detach().clone() for k, m in layers.items()},
            "B": {k: m.w_lora_B.detach().clone() for k, m in layers.items()},
            "gA": {k: m.w_lora_A.grad.clone() for k, m in layers.items()},
            "gB": {k: m.w_lora_B.grad.clone() for k, m in layers.items()}}


def run_plugin(state, values, bank, batches, test):
    """The plugin's setup and the harness's training loop for len(batches) iterations; then evaluation."""
    backbone = benchsuite_backbone(state, image_size=SIZE)
    pm, method = job_manager(get_method("clip_lora"))
    protocol = load_protocol("few_shot")
    recipe = {**HARNESS_DEFAULTS, **pm.hook.recipe(protocol=protocol, dataset="eurosat", shots=1),
              "iterations": len(batches), "image_input": "images"}
    module = pm.hook.setup(ctx=SetupContext(backbone=backbone, classnames=CLASSNAMES, dataset="eurosat",
                                            template="a centered satellite photo of {}.", recipe=recipe,
                                            protocol=protocol, shots=1, seed=1, device=torch.device("cpu")))
    layers = dict(plugin_lora_layers(module.clip))
    for key, branch in layers.items():
        a, b = values[key]
        branch.lora_A.data.copy_(a)
        branch.lora_B.data.copy_(b)
        branch.dropout = FixedDropout(bank, key, TEXT_LENGTH if key[0] == "text" else VISION_LENGTH, "NLD")
    module.train()
    with torch.no_grad():
        logits = method._logits(batches[0][0], method._encode_text(method.train_text))
    stats = train(pm, "clip_lora", module, list(batches), recipe, method.backbone, "images")
    module.eval()
    with torch.no_grad():
        method.prepare_eval(CLASSNAMES, "eurosat", "a centered satellite photo of {}.")
        test_logits = method.predict(EvalBatch(labels=test[1], images=test[0]))
    return {"logits": logits, "loss": torch.tensor(stats.losses["loss"][0]),
            "test": test_logits / recipe["logit_scale"],
            "A": {k: m.lora_A.detach().clone() for k, m in layers.items()},
            "B": {k: m.lora_B.detach().clone() for k, m in layers.items()},
            "gA": {k: m.lora_A.grad.clone() for k, m in layers.items()},
            "gB": {k: m.lora_B.grad.clone() for k, m in layers.items()}}


def stacked(d: dict) -> torch.Tensor:
    return torch.cat([d[k].reshape(-1) for k in sorted(d)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path, help="a checkout of MaxZanella/CLIP-LoRA")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.official / "lora.py").is_file() or not (args.official / "loralib").is_dir():
        raise SystemExit(f"{args.official}: not a CLIP-LoRA checkout (lora.py, loralib/ missing)")

    state = make_state_dict(seed=args.seed, image_size=SIZE)
    width = {"text": state["positional_embedding"].shape[1], "vision": state["visual.conv1.weight"].shape[0]}
    layers = len([k for k in state if k.startswith("transformer.resblocks.") and k.endswith(".attn.in_proj_weight")])
    values = lora_values(args.seed + 7, 2, width, layers)
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = [(torch.randn(BATCH, 3, SIZE, SIZE, generator=gen),
                torch.randint(0, len(CLASSNAMES), (BATCH,), generator=gen)) for _ in range(2)]
    test = (torch.randn(10, 3, SIZE, SIZE, generator=gen), torch.randint(0, len(CLASSNAMES), (10,), generator=gen))

    ok = True
    for steps in (1, 2):
        bank = MaskBank(0.25, args.seed + 3)
        ref = run_official(args.official, state, values, bank, batches[:steps], test)
        out = run_plugin(state, values, bank, batches[:steps], test)
        if steps == 1:
            used = len(bank.masks)
            expected = 2 * layers * len(TARGETS)  # one mask per branch: the same on both sides
            print(f"{'OK ' if used == expected else 'BAD'} dropout masks drawn and shared: {used} (expected {expected})")
            ok &= used == expected
            ok &= report("training logits, step 1 (dropout on)", out["logits"], ref["logits"])
            ok &= report("training loss, step 1", out["loss"], ref["loss"])
            ok &= report("gradient of every lora_B, step 1", stacked(out["gB"]), stacked(ref["gB"]))
            ok &= report("gradient of every lora_A, step 1", stacked(out["gA"]), stacked(ref["gA"]))
        ok &= report(f"lora_A after {steps} AdamW step(s)", stacked(out["A"]), stacked(ref["A"]))
        ok &= report(f"lora_B after {steps} AdamW step(s)", stacked(out["B"]), stacked(ref["B"]))
        ok &= report(f"test cosine logits after {steps} step(s)", out["test"], ref["test"])
    print("parity OK" if ok else "parity FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
