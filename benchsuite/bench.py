"""`benchsuite bench`: time a method's training step and evaluation against the image-encoder floor.

Everything is measured in one process on synthetic inputs with the protocol's shapes: the method's
batch size for the protocol, a real dataset's class names (base half for base2new), images at the
backbone's resolution. The **floor** is the pure forward of the frozen image encoder on the same
images: for a method that trains through a frozen, unprompted image encoder, nothing can be
cheaper, so every other number is reported as a ratio to it. Warm-up iterations are excluded and
the median of the timed iterations is reported. The training step timed is the harness's own
`engine.train.train_step`, run once with the fast paths and once with them switched off.

Methods that prompt the image encoder (no frozen image features) backpropagate through it, so two
more references are timed in the same alternation: the **prompted floor**, the image encoder's
forward and backward with VPT-deep prompts (4 tokens at depth 9, IVLP's shape, clamped to the
model), which no such method can undercut; and **CoOp's** training step on the same batch and
classes, the cheapest text-prompt method. Each method is reported against both.

An ``"images+features"`` method (PromptSRC, MMRL) is timed twice: computing the frozen features of
its batch inside the step, and reading them as a run does from the shared training features
(`engine.training_features`, computed once per epoch for a whole grid), its step then without the
frozen forward.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from .clip.backbone import Backbone
from .data import loaders
from .data.datum import Datum
from .data.transforms import train_transform
from .engine.recipe import Overrides, declarations, resolve_recipe, trains, validate_overrides
from .errors import BenchsuiteError
from .engine.runner import _peak_memory
from .engine.evaluate import compute_features, evaluate, feature_batches, image_batches
from .engine.train import make_optimizer, train_step
from .clip.layer_prompts import LayerPrompts, clamp_depth
from .hookspecs import SetupContext, TrainedDependency
from .methods import get_method, implements, job_manager
from .protocols import Protocol, load_protocol

#: Caltech101 class names in CoOp's label order (the default benchmark shapes: 50 base classes).
CALTECH101 = (
    "face leopard motorbike accordion airplane anchor ant barrel bass beaver binocular bonsai brain "
    "brontosaurus buddha butterfly camera cannon car_side ceiling_fan cellphone chair chandelier "
    "cougar_body cougar_face crab crayfish crocodile crocodile_head cup dalmatian dollar_bill dolphin "
    "dragonfly electric_guitar elephant emu euphonium ewer ferry flamingo flamingo_head garfield gerenuk "
    "gramophone grand_piano hawksbill headphone hedgehog helicopter ibis inline_skate joshua_tree kangaroo "
    "ketch lamp laptop llama lobster lotus mandolin mayfly menorah metronome minaret nautilus octopus okapi "
    "pagoda panda pigeon pizza platypus pyramid revolver rhino rooster saxophone schooner scissors scorpion "
    "sea_horse snoopy soccer_ball stapler starfish stegosaurus stop_sign strawberry sunflower tick trilobite "
    "umbrella watch water_lilly wheelchair wild_cat windsor_chair wrench yin_yang"
).split()


class _Progress:
    """One progress bar over every timed or warm-up call (ViT-B-16 on a CPU takes minutes): the
    bar advances between calls, never inside a timed region."""

    def __init__(self, enabled: bool):
        self.bar = tqdm(total=0, desc="bench", unit="call", leave=False, disable=None if enabled else True)

    def plan(self, calls: int, what: str) -> None:
        self.bar.total += calls
        self.bar.set_description(f"bench: {what}")
        self.bar.refresh()

    def step(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


_QUIET = _Progress(False)


def _timed(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int, progress: _Progress = _QUIET) -> float:
    """Median seconds of `iters` calls after `warmup` untimed ones (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
        progress.step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        progress.step()
    return statistics.median(times)


def _timed_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int,
                       iters: int, progress: _Progress = _QUIET) -> dict[str, float]:
    """Median seconds of each function, timed in alternation so that drifting machine load affects
    the compared measurements alike."""
    progress.plan(len(fns) * (warmup + iters), "/".join(fns))
    for fn in fns.values():
        for _ in range(warmup):
            fn()
            progress.step()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            times[name].append(_timed(fn, device, 0, 1))
            progress.step()
    return {name: statistics.median(t) for name, t in times.items()}


def bench_classnames(protocol: Protocol, n: int | None = None) -> list[str]:
    """Caltech101's class names (the base half for base2new), or `n` of them (numbered repeats past
    101), so that a step is timed on a given number of classes."""
    if n is None:
        return list(CALTECH101[: math.ceil(len(CALTECH101) / 2)] if protocol.task == "base2new" else CALTECH101)
    if n < 1:
        raise BenchsuiteError(f"bench needs at least one class, got {n}")
    k = len(CALTECH101)
    return [CALTECH101[i % k] + (f" {i // k}" if i >= k else "") for i in range(n)]


def bench_backbone(protocol: Protocol, backbone: str | None, pretrained: str | None) -> tuple[str, str]:
    """The model `bench` builds: the one given, else the protocol's own (toy protocols name their small
    CLIP, as `run` follows it), else ViT-B-16 with random weights (no download)."""
    spec = protocol.spec.get("backbone")
    if backbone is None and spec is not None:
        return spec["model"], pretrained or spec["pretrained"]
    return backbone or "ViT-B-16", pretrained or "none"


def _synthetic_jpegs(folder: Path, n: int, seed: int) -> list[Datum]:
    """Photo-sized JPEGs (500x375, like the real datasets) for the data-pipeline measurement."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        arr = torch.randint(0, 256, (375, 500, 3), generator=gen, dtype=torch.uint8).numpy()
        path = folder / f"{i}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        items.append(Datum(str(path), i % 10, f"class{i % 10}"))
    return items


#: VPT-deep prompts of the prompted floor: IVLP/PromptSRC's 4 tokens at depth 9 (clamped to the model).
FLOOR_PROMPT_TOKENS, FLOOR_PROMPT_DEPTH = 4, 9


def _prompted_floor(backbone: Backbone, images: torch.Tensor) -> Callable[[], Any]:
    """Forward and backward of the prompted image encoder (gradients reach only the prompts)."""
    prompts = LayerPrompts(clamp_depth(FLOOR_PROMPT_DEPTH, backbone.vision_layers), FLOOR_PROMPT_TOKENS,
                           backbone.vision_width).to(backbone.device)

    def run() -> None:
        with backbone.autocast():
            features = backbone.encode_image(images, prompts=prompts.input, deep_prompts=prompts.deep())
        features.float().sum().backward()
        prompts.zero_grad(set_to_none=True)
    return run


def _coop_step(backbone: Backbone, ctx: SetupContext, images: torch.Tensor, labels: torch.Tensor,
               protocol) -> Callable[[], Any]:
    """CoOp's training step on the same batch and classes (its own recipe otherwise)."""
    entry = get_method("coop")
    pm, _ = job_manager(entry)
    recipe, _ = resolve_recipe("coop", pm.hook.recipe(protocol=protocol, dataset=ctx.dataset, shots=ctx.shots),
                               protocol.profile, {}, **declarations(entry.cls))
    module = pm.hook.setup(ctx=SetupContext(**{**ctx.__dict__, "recipe": recipe})).to(backbone.device)
    optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad], recipe)
    return lambda: train_step(pm, "coop", module, optimizer, backbone, images, labels, [], recipe["image_input"], 0)


def run_bench(backbone: Backbone, method: str, protocol_id: str = "base2new", *, dataset: str = "caltech101",
              warmup: int = 2, iters: int = 5, eval_images: int = 200, workers: int | None = None,
              seed: int = 0, progress: bool = False, overrides: Overrides | None = None,
              compare: Overrides | None = None, straightforward: bool = True,
              n_classes: int | None = None) -> dict[str, Any]:
    """Measure floor, training step (fast and straightforward), evaluation and data pipeline.

    ``overrides`` change the recipe as ``run --set`` does; ``compare`` (more recipe overrides, on top
    of them) times a second instance of the method in alternation with the first, e.g. a method's
    own benchmark switch (CoCoOp's ``batched_text=false``: its per-image loop); ``straightforward``
    False skips the step with the fast paths off (it costs the most on large text batches);
    ``n_classes`` times that many classes instead of Caltech101's (`benchsuite plan` times a grid's
    own shapes: a text-prompt step costs in proportion to its classes).
    """
    bar = _Progress(progress)
    try:
        return _run_bench(backbone, method, protocol_id, dataset, warmup, iters, eval_images, workers, seed, bar,
                          overrides or {}, compare or {}, straightforward, n_classes)
    finally:
        bar.close()


class UntrainedDependencies:
    """``SetupContext.dependencies`` for bench: a dependency (PromptKD's teacher) is its method's
    module right after ``setup`` on the bench classes, frozen and untrained. bench times a step, and
    a trained teacher's forward costs what an untrained one's does; the caller's random streams are
    left as they were."""

    def __init__(self, ctx: SetupContext, dataset: str):
        self.ctx, self.dataset = ctx, dataset

    def trained(self, method: str) -> TrainedDependency:
        entry = get_method(method)
        pm, instance = job_manager(entry)
        shots, protocol = self.ctx.shots, self.ctx.protocol
        default = pm.hook.recipe(protocol=protocol, dataset=self.dataset, shots=shots)
        recipe, _ = resolve_recipe(method, default, protocol.profile, {}, **declarations(entry.cls))
        with torch.random.fork_rng(devices=[]):
            module = pm.hook.setup(ctx=SetupContext(**{**self.ctx.__dict__, "recipe": recipe,
                                                       "dependencies": None}))
        module.to(self.ctx.device).eval().requires_grad_(False)
        return TrainedDependency(method=instance, module=module, job_id="untrained (bench)", sha256="",
                                 trained=False)


def _fit(pm, entry, backbone: Backbone, n_classes: int, shots: int) -> None:
    """What `run` does between setup and training for a method with `fit_features`: here on random
    features of the shape a job hands it (shots x classes images, `fit_views` views), since bench
    times the step, not the fit."""
    if not implements(pm, pm.get_plugin(f"method:{entry.name}"), "fit_features"):
        return
    n, device = shots * n_classes, backbone.device
    features = torch.randn(int(entry.cls.fit_views), n, backbone.embed_dim, device=device)
    labels = torch.arange(n_classes, device=device).repeat_interleave(shots)
    with torch.no_grad():
        pm.hook.fit_features(features=features, labels=labels, val_features=None, val_labels=None)


def _run_bench(backbone: Backbone, method: str, protocol_id: str, dataset: str, warmup: int, iters: int,
               eval_images: int, workers: int | None, seed: int, bar: _Progress, overrides: Overrides,
               compare: Overrides, straightforward: bool, n_classes: int | None = None) -> dict[str, Any]:
    protocol = load_protocol(protocol_id)
    entry = get_method(method)
    pm, _ = job_manager(entry)
    shots = max(protocol.shots)
    default = pm.hook.recipe(protocol=protocol, dataset=dataset, shots=shots)
    # the entries are checked as `run` checks --set (a typo'd method or key is one clear error, not ignored)
    unchanged, _ = resolve_recipe(method, default, protocol.profile, {}, **declarations(entry.cls))
    overrides = validate_overrides(overrides, {method: [unchanged]})
    compare = validate_overrides(compare, {method: [unchanged]}, flag="--compare")
    recipe, changed = resolve_recipe(method, default, protocol.profile, overrides, **declarations(entry.cls))
    classnames = bench_classnames(protocol, n_classes)
    device = backbone.device
    torch.manual_seed(seed)
    ctx = SetupContext(backbone=backbone, classnames=classnames, dataset=dataset, template="a photo of a {}.",
                       recipe=recipe, protocol=protocol, shots=shots, seed=seed, device=device,
                       all_classnames=list(classnames))
    ctx.dependencies = UntrainedDependencies(ctx, dataset)
    module = pm.hook.setup(ctx=ctx).to(device)
    _fit(pm, entry, backbone, len(classnames), shots)
    variant = None
    if compare:
        merged: Overrides = {k: dict(v) for k, v in overrides.items()}
        for key, values in compare.items():
            merged.setdefault(key, {}).update(values)
        variant_recipe, _ = resolve_recipe(method, default, protocol.profile, merged, **declarations(entry.cls))
        variant_changed = {k: v for k, v in variant_recipe.items() if recipe.get(k) != v}
        if not variant_changed:
            raise BenchsuiteError(f"bench --compare: the overrides change nothing in {method}'s recipe; name its keys "
                                  f"as {method}.KEY=VALUE or KEY=VALUE")
        if variant_recipe["batch_size"] != recipe["batch_size"]:
            raise BenchsuiteError("bench --compare must keep the batch size of the measured recipe; "
                                  "change it for both with --set")
        variant_pm, _ = job_manager(entry)
        torch.manual_seed(seed)
        variant_ctx = SetupContext(**{**ctx.__dict__, "recipe": variant_recipe})
        variant = (variant_pm, variant_pm.hook.setup(ctx=variant_ctx).to(device))
        _fit(variant_pm, entry, backbone, len(classnames), shots)
    batch = int(recipe["batch_size"])
    size = backbone.image_spec.size
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, len(classnames), (batch,), device=device)
    image_input = recipe["image_input"]
    frozen = image_input == "features"
    n_views = len(pm.hook.train_views(image_spec=backbone.image_spec) or [])
    views = [torch.randn_like(images) for _ in range(n_views)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def floor() -> None:
        with torch.no_grad(), backbone.autocast():
            backbone.encode_image(images)

    out: dict[str, Any] = {"method": method, "protocol": protocol_id, "backbone": backbone.model_name,
                           "pretrained": backbone.pretrained, "precision": backbone.precision, "device": str(device),
                           "batch_size": batch, "n_classes": len(classnames), "threads": torch.get_num_threads(),
                           "recipe_overrides": changed}
    if variant is not None:
        out["compare_overrides"] = variant_changed
    params = [p for p in module.parameters() if p.requires_grad]
    if trains(recipe) and params:
        optimizer = make_optimizer(params, recipe)
        truncate = backbone.truncate_text

        def fast(fn: Callable[[], Any], truncated: bool = True) -> Callable[[], Any]:
            """`fn` run with the text truncation on (the fast path) or off; every timed call sets it,
            since the calls alternate and the straightforward step switches it off."""
            def run() -> Any:
                backbone.truncate_text = truncated
                return fn()
            return run

        def step() -> Any:
            return train_step(pm, method, module, optimizer, backbone, images, labels, views, image_input, 0)

        timed = {"floor": floor, "fast": fast(step)}
        if straightforward:
            timed["straightforward"] = fast(step, truncated=False)
        if variant is not None:
            variant_params = [p for p in variant[1].parameters() if p.requires_grad]
            variant_optimizer = make_optimizer(variant_params, variant_recipe)
            timed["compare"] = fast(lambda: train_step(variant[0], method, variant[1], variant_optimizer, backbone,
                                                       images, labels, views, image_input, 0))
        if image_input == "images+features" and not n_views:
            with torch.no_grad(), backbone.autocast():
                shared = backbone.encode_image(images).float()  # what the shared training features hold
            timed["shared_features"] = fast(lambda: train_step(pm, method, module, optimizer, backbone, images, labels,
                                                               views, image_input, 0, features=shared))
        if not frozen:
            timed["prompted_floor"] = _prompted_floor(backbone, images)
            if method != "coop":
                timed["coop"] = fast(_coop_step(backbone, ctx, images, labels, protocol))
        try:
            seconds = _timed_interleaved(timed, device, warmup, iters, bar)
        finally:
            backbone.truncate_text = truncate
        out["floor_ms_per_image"] = 1000 * seconds["floor"] / batch
        out["train_ms_per_image"] = 1000 * seconds["fast"] / batch
        out["train_ratio_to_floor"] = out["train_ms_per_image"] / out["floor_ms_per_image"]
        if straightforward:
            out["train_straightforward_ms_per_image"] = 1000 * seconds["straightforward"] / batch
            out["train_straightforward_ratio_to_floor"] = (out["train_straightforward_ms_per_image"]
                                                           / out["floor_ms_per_image"])
        if variant is not None:
            out["train_compare_ms_per_image"] = 1000 * seconds["compare"] / batch
            out["train_compare_ratio_to_floor"] = out["train_compare_ms_per_image"] / out["floor_ms_per_image"]
            out["train_speedup_over_compare"] = out["train_compare_ms_per_image"] / out["train_ms_per_image"]
        if "prompted_floor" in seconds:
            out["prompted_floor_ms_per_image"] = 1000 * seconds["prompted_floor"] / batch
            out["train_ratio_to_prompted_floor"] = out["train_ms_per_image"] / out["prompted_floor_ms_per_image"]
        if "shared_features" in seconds:
            out["train_shared_features_ms_per_image"] = 1000 * seconds["shared_features"] / batch
            out["train_shared_features_ratio_to_floor"] = (out["train_shared_features_ms_per_image"]
                                                           / out["floor_ms_per_image"])
            if "prompted_floor_ms_per_image" in out:
                out["train_shared_features_ratio_to_prompted_floor"] = (out["train_shared_features_ms_per_image"]
                                                                        / out["prompted_floor_ms_per_image"])
        if "coop" in seconds:
            out["coop_train_ms_per_image"] = 1000 * seconds["coop"] / batch
            out["train_ratio_to_coop"] = out["train_ms_per_image"] / out["coop_train_ms_per_image"]
    else:
        bar.plan(warmup + iters, "floor")
        out["floor_ms_per_image"] = 1000 * _timed(floor, device, warmup, iters, bar) / batch
    out.update(_bench_eval(backbone, pm, method, module, classnames, frozen, eval_images, warmup, iters, seed, bar))
    out["eval_ratio_to_floor"] = out["eval_images_per_second"] / out["eval_floor_images_per_second"]
    bar.plan(1, "data pipeline")
    out.update(_bench_data(backbone, batch, workers, seed))
    bar.step()
    step_rate = batch / (out.get("train_ms_per_image", out["floor_ms_per_image"]) * batch / 1000)
    out["data_ratio_to_step"] = out["data_images_per_second"] / step_rate
    out["peak_memory_bytes"], out["peak_memory_kind"] = _peak_memory(device)
    return out


@torch.no_grad()
def _bench_eval(backbone: Backbone, pm, method: str, module, classnames, frozen: bool, n: int, warmup: int,
                iters: int, seed: int, bar: _Progress = _QUIET) -> dict[str, Any]:
    """Evaluation images/s in test batches of 100, through the harness's own `evaluate`: the floor
    (encoder only), a first method (image features computed, as on a cache miss) and a second
    method on the same backbone and test set (features reused, as on a cache hit)."""
    device = backbone.device
    gen = torch.Generator().manual_seed(seed)
    size = backbone.image_spec.size
    test = torch.randn(n, 3, size, size, generator=gen)
    labels = torch.randint(0, len(classnames), (n,), generator=gen)
    loader = [(test[s:s + 100], labels[s:s + 100]) for s in range(0, n, 100)]
    held: list = []

    def features():
        if not held:
            held.append(compute_features(backbone, loader))
        return held[0]

    def run(batches) -> None:
        evaluate(pm, method, module, batches, list(classnames), "bench", "a photo of a {}.", backbone)

    def first() -> None:
        held.clear()
        run(feature_batches(features, 100, device) if frozen else image_batches(loader, device))

    def floor() -> None:
        compute_features(backbone, loader)

    seconds = _timed_interleaved({"floor": floor, "first": first}, device, 1, max(1, iters // 2), bar)
    out = {"eval_images": n, "eval_floor_images_per_second": n / seconds["floor"],
           "eval_images_per_second": n / seconds["first"]}
    if frozen:
        bar.plan(1 + iters, "eval with cached features")
        out["eval_cached_images_per_second"] = n / _timed(lambda: run(feature_batches(features, 100, device)),
                                                          device, 1, iters, bar)
    return out


def _bench_data(backbone: Backbone, batch: int, workers: int | None, seed: int) -> dict[str, Any]:
    """Augmented batches per second from decoded-once photo-sized JPEGs (the harness's train loader)."""
    workers = loaders.default_workers(backbone.device) if workers is None else workers
    with tempfile.TemporaryDirectory() as tmp:
        items = _synthetic_jpegs(Path(tmp), 4 * batch, seed)
        loader = loaders.train_loader(items, train_transform(backbone.image_spec), batch, workers=workers,
                                      pin_memory=backbone.device.type == "cuda")
        next(iter(loader))  # warm-up (and worker start)
        start = time.perf_counter()
        count = 0
        for _ in range(2):
            for images, _labels in loader:
                count += images.shape[0]
        seconds = time.perf_counter() - start
    return {"data_images_per_second": count / seconds, "data_workers": workers}


def format_report(r: dict[str, Any]) -> str:
    """The human-readable table printed by `benchsuite bench`."""
    from tabulate import tabulate

    floor = r["floor_ms_per_image"]
    rows = [("image-encoder floor (forward)", f"{floor:.2f} ms/img", "1.00x")]
    if "prompted_floor_ms_per_image" in r:
        rows.append(("prompted image encoder fwd+bwd (prompted floor)", f"{r['prompted_floor_ms_per_image']:.2f} ms/img",
                     f"{r['prompted_floor_ms_per_image'] / floor:.2f}x"))
    if "coop_train_ms_per_image" in r:
        rows.append(("CoOp train step, same batch", f"{r['coop_train_ms_per_image']:.2f} ms/img",
                     f"{r['coop_train_ms_per_image'] / floor:.2f}x"))
    if "train_ms_per_image" in r:
        rows.append(("train step, fast path", f"{r['train_ms_per_image']:.2f} ms/img", f"{r['train_ratio_to_floor']:.2f}x"))
        if "train_ratio_to_prompted_floor" in r:
            rows.append(("  vs prompted floor", "", f"{r['train_ratio_to_prompted_floor']:.2f}x"))
        if "train_ratio_to_coop" in r:
            rows.append(("  vs CoOp", "", f"{r['train_ratio_to_coop']:.2f}x"))
        if "train_shared_features_ms_per_image" in r:
            rows.append(("train step, frozen features shared (grid)", f"{r['train_shared_features_ms_per_image']:.2f} ms/img",
                         f"{r['train_shared_features_ratio_to_floor']:.2f}x"))
            if "train_shared_features_ratio_to_prompted_floor" in r:
                rows.append(("  vs prompted floor", "", f"{r['train_shared_features_ratio_to_prompted_floor']:.2f}x"))
        if "train_straightforward_ms_per_image" in r:
            rows.append(("train step, straightforward", f"{r['train_straightforward_ms_per_image']:.2f} ms/img",
                         f"{r['train_straightforward_ratio_to_floor']:.2f}x"))
        if "train_compare_ms_per_image" in r:
            what = " ".join(f"{k}={v}" for k, v in r["compare_overrides"].items())
            rows.append((f"train step, --compare {what}", f"{r['train_compare_ms_per_image']:.2f} ms/img",
                         f"{r['train_compare_ratio_to_floor']:.2f}x (fast path {r['train_speedup_over_compare']:.2f}x "
                         f"faster)"))
    rows.append(("eval floor (encoder only)", f"{r['eval_floor_images_per_second']:.1f} img/s", "1.00x"))
    rows.append(("eval, first method", f"{r['eval_images_per_second']:.1f} img/s", f"{r['eval_ratio_to_floor']:.2f}x"))
    if "eval_cached_images_per_second" in r:
        rows.append(("eval, second method (cached features)", f"{r['eval_cached_images_per_second']:.1f} img/s",
                     f"{r['eval_cached_images_per_second'] / r['eval_floor_images_per_second']:.1f}x"))
    rows.append((f"data pipeline ({r['data_workers']} workers)", f"{r['data_images_per_second']:.1f} img/s",
                 f"{r['data_ratio_to_step']:.1f}x the step's consumption"))
    rows.append(("peak memory", f"{r['peak_memory_bytes'] / 2**20:.0f} MiB ({r['peak_memory_kind']})", ""))
    head = (f"{r['method']} on {r['backbone']}/{r['pretrained']} ({r['precision']}, {r['device']}, "
            f"{r['threads']} threads), protocol {r['protocol']}: batch {r['batch_size']}, {r['n_classes']} classes")
    if r.get("recipe_overrides"):
        head += " (--set " + " ".join(f"{k}={v}" for k, v in r["recipe_overrides"].items()) + ")"
    return head + "\n" + tabulate(rows, headers=["measurement", "value", "vs floor"])
