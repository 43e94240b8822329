"""pytest-benchmark suite: every fast path beside its straightforward twin (run: python -m pytest benchmarks).

The backbone defaults to the shipped small CLIP architecture with random weights, so the suite runs
in minutes on a laptop; set BENCHSUITE_BENCH_BACKBONE=ViT-B-16 for the real shapes.
"""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session")
def backbone():
    from benchsuite.clip.backbone import load_backbone
    from benchsuite.toy.pretrain import register_config

    register_config()
    torch.set_num_threads(int(os.environ.get("BENCHSUITE_BENCH_THREADS", "2")))
    name = os.environ.get("BENCHSUITE_BENCH_BACKBONE", "bs-toy-clip")
    return load_backbone(name, "none", precision="fp32", device="cpu")
