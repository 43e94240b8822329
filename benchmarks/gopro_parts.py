"""GOPro's training step split into its parts, each against the prompted floor (issue 23).

    python benchmarks/gopro_parts.py [--backbone ViT-B-16] [--batch 4] [--iters 3]

On ViT-B-16 shapes with random weights, fp32, base2new's 50 Caltech101 base classes: the frozen
forward of GOPro's 3 views with the block statistics its conditioner reads, and the text pass of
its 3 x batch x 50 per-image prompts (forward and backward), each timed in alternation with the
prompted floor `benchsuite bench` uses (median of --iters after one warm-up). It shows which part
keeps GOPro's step above 2x that floor. Not a test: speed is never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from benchsuite.bench import _prompted_floor, bench_classnames
from benchsuite.clip.backbone import load_backbone
from benchsuite.engine.recipe import declarations, resolve_recipe
from benchsuite.hookspecs import SetupContext
from benchsuite.methods import get_method, job_manager
from benchsuite.protocols import load_protocol


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    if args.batch < 1 or args.iters < 1:
        parser.error(f"--batch and --iters take positive integers (got --batch {args.batch}, --iters {args.iters})")

    torch.manual_seed(0)
    backbone = load_backbone(args.backbone, "none")
    protocol = load_protocol("base2new")
    classes = bench_classnames(protocol)
    entry = get_method("gopro")
    pm, _ = job_manager(entry)
    # the recipe a base2new job resolves (as `benchsuite bench` does), not a hand-merged copy
    recipe, _ = resolve_recipe("gopro", pm.hook.recipe(protocol=protocol, dataset="caltech101", shots=16),
                               protocol.profile, {}, **declarations(entry.cls))
    ctx = SetupContext(backbone=backbone, classnames=classes, dataset="caltech101", template="a photo of a {}.",
                       recipe=recipe, protocol=protocol, shots=16, seed=0, device=torch.device("cpu"))
    module = pm.hook.setup(ctx=ctx)
    b = args.batch
    views = torch.randn(3 * b, 3, backbone.image_spec.size, backbone.image_spec.size)
    with torch.no_grad():
        _, shift = module.encode_views(backbone, views)

    def frozen_views() -> None:
        module.encode_views(backbone, views)

    def text_pass() -> None:
        module.text_features(shift.detach().requires_grad_(True)).sum().backward()

    def frozen_floor() -> None:
        with torch.no_grad():
            backbone.encode_image(views[:b])

    parts: dict[str, Callable[[], None]] = {
        f"prompted floor (batch {b})": _prompted_floor(backbone, views[:b]),
        f"frozen floor (batch {b})": frozen_floor,
        f"3 views: frozen forward + block statistics ({3 * b} images)": frozen_views,
        f"text pass: 3 x {b} x {len(classes)} prompts, forward + backward": text_pass,
    }
    seconds: dict[str, list[float]] = {k: [] for k in parts}
    for i in range(args.iters + 1):
        for name, fn in parts.items():
            start = time.perf_counter()
            fn()
            if i:  # the first round is the warm-up
                seconds[name].append(time.perf_counter() - start)
    floor = statistics.median(seconds[next(iter(parts))])
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name}: {1000 * median / b:.1f} ms per training image, {median / floor:.2f}x the prompted floor")


if __name__ == "__main__":
    main()
