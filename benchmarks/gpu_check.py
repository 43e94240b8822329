"""The GPU check `benchmarks/gpu_check.sh` runs: every method on CUDA against the CPU, under amp and bf16,
and `bench` on ViT-B-16 shapes, within one short device session (about ten minutes on one GPU).

Phases (each method in its own try: a broken method is a failed row, never a crash of the check):

1. parity: on the toy CLIP's weights, every method's logits, training loss and first optimizer step
   in fp32 on the device (TF32 off) against the CPU, from the same initial state and inputs. A
   method whose step draws random numbers cannot match across devices (their generators differ);
   the CPU tells (the same step under another seed) and such rows compare logits only.
2. precision: every trained method's step for a few iterations under amp (with the GradScaler the
   loop uses) and bf16: finite losses, the scale, skipped steps, parameters moved, and host syncs
   per step (CUDA's sync debug mode in "warn", its warnings counted).
3. bench: `benchsuite.bench.run_bench` for every method on ViT-B-16 (random weights: the same speed,
   no download); one JSON per method (what `benchsuite bench --json` writes, so `benchsuite plan
   --bench-json` reads it) and one markdown table.

Without CUDA, or with --dry-run, the device is the CPU: the same comparisons run CPU against CPU
(bench on the toy CLIP's small shapes) and the report says CUDA was absent. Output: gpu_check.json,
gpu_check.md and bench/<method>.json in --out (default $OUT, else ./gpu-check-out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

#: what the checks build: the toy CLIP on classes of the toy world it was trained on (its logits
#: then mean something), a small batch; bench times the real protocol's shapes
PROTOCOL, DATASET, TEMPLATE, SHOTS = "toy_base2new", "toy_objects", "a photo of a {}.", 16
BENCH_PROTOCOL = "base2new"
N_CLASSES, BATCH = 10, 8
#: largest relative differences accepted between the device (fp32, TF32 off) and the CPU
TOLERANCE = {"logits": 1e-3, "loss": 1e-3, "step": 1e-3}
#: left out of --list-requirements: the GPU machine brings torch (and triton, the CUDA libraries);
#: torchvision must be the build matching that torch, downloaded on its own (gpu_check.sh's header)
PROVIDED = ("torch", "triton", "torchvision")


def requirements() -> list[str]:
    """`name==version` of every installed distribution benchsuite[test] needs, except torch, its CUDA
    libraries and torchvision (see PROVIDED): the list to build the wheel folder from."""
    from importlib import metadata
    from packaging.requirements import Requirement

    seen: dict[str, str] = {}
    todo = [("benchsuite", {"test"})]
    while todo:
        name, extras = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
                continue
            key = req.name.lower().replace("_", "-")
            if key in seen or key in PROVIDED or key.startswith("nvidia-"):
                continue
            try:
                seen[key] = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                continue
            todo.append((req.name, set(req.extras)))
    return [f"{k}=={v}" for k, v in sorted(seen.items())]


@dataclass
class Built:
    """One method set up on one backbone, as a job builds it."""

    method: str
    pm: Any
    module: Any
    recipe: dict[str, Any]
    classnames: list[str]


def _call(pm, hook: str, **kwargs) -> Any:
    """Call a hook with the arguments its spec declares (the contract grows; the check should not break)."""
    caller = getattr(pm.hook, hook)
    names = caller.spec.argnames if caller.spec is not None else tuple(kwargs)
    return caller(**{k: v for k, v in kwargs.items() if k in names})


def toy_backbone(precision: str, device):
    from benchsuite.clip.backbone import load_backbone
    from benchsuite.protocols import load_protocol

    spec = load_protocol("toy_base2new").spec["backbone"]
    return load_backbone(spec["model"], spec["pretrained"], precision=precision, device=device)


def build(method: str, backbone, seed: int = 0) -> Built:
    import torch

    from benchsuite.engine.recipe import declarations, resolve_recipe
    from benchsuite.hookspecs import SetupContext
    from benchsuite.methods import get_method, implements, job_manager
    from benchsuite.protocols import load_protocol
    from benchsuite.toy.datasets import toy_datasets

    protocol = load_protocol(PROTOCOL)
    entry = get_method(method)
    pm, plugin = job_manager(entry)
    batch = max(BATCH, int(getattr(entry.cls, "min_batch_size", 1)))
    default = pm.hook.recipe(protocol=protocol, dataset=DATASET, shots=SHOTS)
    recipe, _ = resolve_recipe(method, default, protocol.profile, {None: {"batch_size": batch}},
                               **declarations(entry.cls))
    classnames = list(toy_datasets()[DATASET].classnames[:N_CLASSES])
    torch.manual_seed(seed)
    ctx = SetupContext(backbone=backbone, classnames=classnames, dataset=DATASET, template=TEMPLATE, recipe=recipe,
                       protocol=protocol, shots=SHOTS, seed=seed, device=backbone.device)
    module = pm.hook.setup(ctx=ctx).to(backbone.device)
    built = Built(method, pm, module, recipe, classnames)
    if hasattr(pm.hook, "fit_features") and implements(pm, plugin, "fit_features"):
        images, labels, _ = inputs(built, backbone)
        with torch.no_grad(), backbone.autocast():
            feats = backbone.encode_image(images.to(backbone.device)).float()
        views = int(getattr(entry.cls, "fit_views", 1))
        with torch.no_grad(), backbone.autocast():
            _call(pm, "fit_features", features=feats.unsqueeze(0).expand(views, -1, -1).contiguous(),
                  labels=labels.to(backbone.device), val_features=None, val_labels=None)
    return built


def inputs(built: Built, backbone, seed: int = 0):
    """Fixed images, labels and extra views (CPU tensors: each device gets the same values)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    size, batch = backbone.image_spec.size, int(built.recipe["batch_size"])
    images = torch.randn(batch, 3, size, size, generator=gen)
    labels = torch.randint(0, len(built.classnames), (batch,), generator=gen)
    n_views = len(built.pm.hook.train_views(image_spec=backbone.image_spec) or [])
    return images, labels, [torch.randn(batch, 3, size, size, generator=gen) for _ in range(n_views)]


def logits(built: Built, backbone, images, labels):
    import torch

    from benchsuite.hookspecs import EvalBatch, LabelSpace

    device = backbone.device
    built.module.eval()
    names = built.classnames
    with torch.no_grad(), backbone.autocast():
        _call(built.pm, "prepare_eval", classnames=names, dataset=DATASET, template=TEMPLATE,
              label_space=LabelSpace.of(DATASET, names, DATASET, names))
        if built.recipe["image_input"] == "features":
            batch = EvalBatch(labels=labels.to(device), image_features=backbone.encode_image(images.to(device)).float())
        else:
            batch = EvalBatch(labels=labels.to(device), images=images.to(device))
        return built.pm.hook.predict(batch=batch).float().cpu()


def first_step(built: Built, backbone, images, labels, views, seed: int = 0):
    """(loss, parameter changes) of one optimizer step as the training loop takes it."""
    import torch

    from benchsuite.engine.train import make_optimizer, parameter_groups, train_step

    built.module.train()
    optimizer = make_optimizer(parameter_groups(built.pm, built.method, built.module, built.recipe), built.recipe)
    before = {n: p.detach().clone() for n, p in built.module.named_parameters() if p.requires_grad}
    torch.manual_seed(seed)
    out = train_step(built.pm, built.method, built.module, optimizer, backbone, images, labels, views,
                     built.recipe["image_input"], 0)
    after = dict(built.module.named_parameters())
    return float(out["loss"].detach()), {n: (after[n].detach() - p).cpu() for n, p in before.items()}


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) if a.numel() else 0.0


def _step_rel(a: dict, b: dict) -> float:
    scale = max((float(d.abs().max()) for d in a.values() if d.numel()), default=0.0)
    diff = max((float((a[n].double() - b[n].double()).abs().max()) for n in a if a[n].numel()), default=0.0)
    return diff / max(scale, 1e-12)


@contextlib.contextmanager
def tf32_off():
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def parity(method: str, ref_backbone, backbone) -> dict[str, Any]:
    """Logits, loss and first step of `method` on `backbone` against `ref_backbone` (same weights)."""
    import copy

    from benchsuite.engine.recipe import trains

    ref = build(method, ref_backbone)
    initial = copy.deepcopy(ref.module.state_dict())
    dev = build(method, backbone)
    dev.module.load_state_dict(initial)
    images, labels, views = inputs(ref, ref_backbone)
    row: dict[str, Any] = {"method": method, "logits": _rel(logits(ref, ref_backbone, images, labels),
                                                           logits(dev, backbone, images, labels))}
    if trains(ref.recipe):
        loss, delta = first_step(ref, ref_backbone, images, labels, views)
        dev_loss, dev_delta = first_step(dev, backbone, images, labels, views)
        again = build(method, ref_backbone)
        again.module.load_state_dict(initial)
        other, _ = first_step(again, ref_backbone, images, labels, views, seed=1)
        row.update(loss=abs(loss - dev_loss) / max(abs(loss), 1e-12), step=_step_rel(delta, dev_delta),
                   stochastic=abs(other - loss) > 1e-6 * max(abs(loss), 1.0))
    compared = ["logits"] + ([] if row.get("stochastic", True) else ["loss", "step"])
    row["ok"] = all(row[k] <= TOLERANCE[k] for k in compared)
    return row


@contextlib.contextmanager
def count_syncs(device):
    """Host syncs inside the block (CUDA's sync debug mode warns at each); None off CUDA."""
    import torch

    box = SimpleNamespace(n=None)
    if device.type != "cuda":
        yield box
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield box
        finally:
            torch.cuda.set_sync_debug_mode("default")
    box.n = sum("synchroniz" in str(w.message) for w in caught)


def precision_steps(method: str, backbone, steps: int) -> dict[str, Any]:
    """`steps` training steps under the backbone's precision, with the loop's GradScaler."""
    import torch

    from benchsuite.engine.recipe import trains
    from benchsuite.engine.train import make_grad_scaler, make_optimizer, parameter_groups, train_step

    built = build(method, backbone)
    row: dict[str, Any] = {"method": method, "precision": backbone.precision}
    if not trains(built.recipe):
        return {**row, "ok": True, "note": "does not train"}
    device = backbone.device
    images, labels, views = (t.to(device) if not isinstance(t, list) else [v.to(device) for v in t]
                             for t in inputs(built, backbone))
    scaler = make_grad_scaler(backbone)
    optimizer = make_optimizer(parameter_groups(built.pm, method, built.module, built.recipe), built.recipe,
                               fused=scaler is not None)
    initial = {n: p.detach().clone() for n, p in built.module.named_parameters() if p.requires_grad}
    built.module.train()
    losses, skipped, syncs = [], [], []
    for _ in range(steps):
        with count_syncs(device) as counted:
            out = train_step(built.pm, method, built.module, optimizer, backbone, images, labels, views,
                             built.recipe["image_input"], 0, scaler, skipped)
        losses.append(out["loss"].detach())
        syncs.append(counted.n)
    values = torch.stack(losses).float().cpu().tolist()
    moved = any(not torch.equal(p.detach(), initial[n]) for n, p in built.module.named_parameters() if n in initial)
    scale = float(scaler.get_scale()) if scaler is not None else None
    row.update(losses=values, skipped=int(sum(int(s.cpu()) for s in skipped)), scale=scale, moved=moved,
               syncs_first=syncs[0], syncs_steady=max(syncs[1:]) if len(syncs) > 1 and syncs[1] is not None else None,
               scaler=scaler is not None)
    row["ok"] = all(math.isfinite(v) for v in values) and moved and (scale is None or (math.isfinite(scale)
                                                                                       and scale > 0))
    return row


def _guarded(fn: Callable[[], dict[str, Any]], method: str, **extra) -> dict[str, Any]:
    try:
        return fn()
    except Exception as exc:  # one method's failure is its row
        return {"method": method, **extra, "ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def bench_all(methods: list[str], model: str, device, out: Path, dry: bool, deadline: float) -> list[dict[str, Any]]:
    from tqdm import tqdm

    from benchsuite.bench import run_bench
    from benchsuite.clip.backbone import default_precision, load_backbone

    backbone = load_backbone(model, "none", precision=default_precision(device), device=device)
    settings = dict(warmup=0, iters=1, eval_images=20, straightforward=False) if dry else \
        dict(warmup=2, iters=5, eval_images=200, straightforward=False)
    rows = []
    (out / "bench").mkdir(parents=True, exist_ok=True)
    for method in tqdm(methods, desc="gpu_check: bench", unit="method", disable=None):
        if time.monotonic() > deadline:
            rows.append({"method": method, "ok": False, "error": "skipped: the time budget is spent"})
            continue
        try:
            report = run_bench(backbone, method, BENCH_PROTOCOL, **settings)
        except Exception as exc:
            rows.append({"method": method, "ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            continue
        (out / "bench" / f"{method}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        rows.append({**report, "ok": True})
    return rows


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}e}" if value and abs(value) < 1e-2 else f"{value:.{digits}f}"
    return str(value)


def markdown(record: dict[str, Any]) -> str:
    head = (f"# GPU check\n\ndevice: {record['device']} ({record['device_name']}); CUDA "
            f"{'present' if record['cuda'] else 'ABSENT: every comparison ran CPU against CPU'}"
            f"{' (dry run)' if record['dry_run'] else ''}; torch {record['torch']}; {record['seconds']:.0f} s ("
            + ", ".join(f"{k} {v:.0f} s" for k, v in record["phase_seconds"].items()) + ")\n")
    lines = [head, "## Parity (fp32, TF32 off) against the CPU\n",
             "| method | logits rel. diff | loss rel. diff | first step rel. diff | step draws random numbers | ok |",
             "|---|---|---|---|---|---|"]
    for r in record["parity"]:
        lines.append(f"| {r['method']} | {_fmt(r.get('logits'))} | {_fmt(r.get('loss'))} | {_fmt(r.get('step'))} | "
                     f"{_fmt(r.get('stochastic'))} | {_fmt(r['ok'])}{' ' + r['error'] if 'error' in r else ''} |")
    lines += ["", "## Training steps under amp and bf16\n",
              "| method | precision | loss first -> last | skipped | GradScaler scale | host syncs (1st, steady) | ok |",
              "|---|---|---|---|---|---|---|"]
    for r in record["precision"]:
        losses = r.get("losses") or []
        loss = f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else r.get("note", "-")
        lines.append(f"| {r['method']} | {r.get('precision', '-')} | {loss} | {_fmt(r.get('skipped'))} | "
                     f"{_fmt(r.get('scale'))} | {_fmt(r.get('syncs_first'))}, {_fmt(r.get('syncs_steady'))} | "
                     f"{_fmt(r['ok'])}{' ' + r['error'] if 'error' in r else ''} |")
    lines += ["", f"## bench on {record['bench_model']}\n",
              "| method | batch | classes | floor ms/img | train ms/img | x floor | x prompted floor | eval img/s | "
              "eval cached img/s | peak MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["bench"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['error']} |||||||||")
            continue
        lines.append(f"| {r['method']} | {r['batch_size']} | {r['n_classes']} | {_fmt(r['floor_ms_per_image'], 3)} | "
                     f"{_fmt(r.get('train_ms_per_image'), 3)} | {_fmt(r.get('train_ratio_to_floor'))} | "
                     f"{_fmt(r.get('train_ratio_to_prompted_floor'))} | {r['eval_images_per_second']:.0f} | "
                     f"{_fmt(r.get('eval_cached_images_per_second'), 0)} | {r['peak_memory_bytes'] / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out", help="output folder (default $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="CPU against CPU, small bench shapes")
    parser.add_argument("--methods", nargs="+", help="default: every installed method")
    parser.add_argument("--bench-model", help="default ViT-B-16 (a dry run: bs-toy-clip)")
    parser.add_argument("--steps", type=int, help="training steps per precision (default 5; on the CPU 2)")
    parser.add_argument("--budget-s", type=float, default=420,
                        help="seconds after which bench starts no more methods (default 420: the script fits 10 min)")
    parser.add_argument("--no-bench", action="store_true", help="skip the bench phase")
    parser.add_argument("--list-requirements", action="store_true",
                        help="print the distributions to put in the wheel folder (all but torch) and exit")
    args = parser.parse_args(argv)
    if args.list_requirements:
        print("\n".join(requirements()))
        return 0
    import torch

    from benchsuite.methods import discover

    start = time.monotonic()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda and not args.dry_run else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = args.methods or sorted(discover())
    print(f"gpu_check: {'CUDA present' if cuda else 'CUDA ABSENT'}; comparing {device} against cpu"
          f"{' (dry run)' if args.dry_run else ''}; {len(methods)} method(s); output in {out}", flush=True)
    from tqdm import tqdm

    phases: dict[str, float] = {}
    ref = toy_backbone("fp32", "cpu")
    dev = toy_backbone("fp32", device)
    with tf32_off():
        parity_rows = [_guarded(lambda m=m: parity(m, ref, dev), m)
                       for m in tqdm(methods, desc="gpu_check: parity", unit="method", disable=None)]
    phases["parity"] = time.monotonic() - start
    precision_rows = []
    for precision in ("amp", "bf16"):
        backbone = toy_backbone(precision, device)
        steps = args.steps or (5 if device.type == "cuda" else 2)
        precision_rows += [_guarded(lambda m=m: precision_steps(m, backbone, steps), m, precision=precision)
                           for m in tqdm(methods, desc=f"gpu_check: {precision}", unit="method", disable=None)]
    phases["precision"] = time.monotonic() - start - sum(phases.values())
    model = args.bench_model or ("ViT-B-16" if device.type == "cuda" else "bs-toy-clip")
    bench_rows = [] if args.no_bench else bench_all(methods, model, device, out, device.type != "cuda",
                                                   start + args.budget_s)
    phases["bench"] = time.monotonic() - start - sum(phases.values())
    record = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "cuda": cuda, "dry_run": args.dry_run, "torch": torch.__version__, "bench_model": model,
              "tolerance": TOLERANCE, "phase_seconds": phases, "parity": parity_rows, "precision": precision_rows, "bench": bench_rows,
              "seconds": time.monotonic() - start}
    (out / "gpu_check.json").write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    (out / "gpu_check.md").write_text(markdown(record), encoding="utf-8")
    failed = [f"{r['method']} {phase}{' ' + r.get('precision', '') if phase == 'precision' else ''}: "
              f"{r.get('error', 'out of tolerance or not finite')}"
              for phase, rows in (("parity", parity_rows), ("precision", precision_rows), ("bench", bench_rows))
              for r in rows if not r["ok"]]
    print(f"gpu_check: {len(methods)} method(s) in {record['seconds']:.0f} s ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()) + f"); {len(failed)} problem(s); "
          f"report {out / 'gpu_check.md'}")
    for line in failed:
        print(f"  FAILED {line}")
    if not cuda:
        print("gpu_check: CUDA was absent: the device comparisons ran CPU against CPU")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
