"""Time the image preflight (`benchsuite.data.images.check_images`) on N photo-sized JPEGs.

    python benchmarks/image_check.py --n 10000 --folder /tmp/bs-image-check

The fixture (500x375 JPEGs, quality 90, smooth content with noise like a photo's) is written once
into --folder and reused; one file is truncated and one removed so the problem path is exercised.
Prints the wall time of the check and files per second (not a test: speed is never asserted).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchsuite.data.images import check_images


def build(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    paths = []
    for i in range(n):
        path = folder / f"{i:05d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        base = (np.sin(xx / (20 + i % 50)) * 60 + np.cos(yy / (15 + i % 30)) * 60 + 128)[..., None]
        pixels = np.clip(base + rng.normal(0, 12, (375, 500, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--folder", default="/tmp/bs-image-check")
    args = parser.parse_args()
    paths = build(Path(args.folder), args.n)
    damaged = Path(args.folder) / "damaged.jpg"
    damaged.write_bytes(paths[0].read_bytes()[:5000])
    entries = [("fixture", f"test[{i}]", str(p)) for i, p in enumerate(paths)]
    entries.append(("fixture", f"test[{len(paths)}]", str(damaged)))
    entries.append(("fixture", f"test[{len(paths) + 1}]", str(Path(args.folder) / "missing.jpg")))
    start = time.perf_counter()
    problems = check_images(entries)
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in paths) / 2**20
    print(f"{len(entries)} files ({size:.0f} MiB) checked in {seconds:.2f} s = {len(entries) / seconds:.0f} files/s; "
          f"{len(problems)} problems:")
    for line in problems:
        print(" ", line)


if __name__ == "__main__":
    main()
