"""The comparisons of the GPU check (benchmarks/gpu_check.py). The tests marked `cuda` compare a method
on CUDA with the CPU and skip without CUDA (`benchmarks/gpu_check.sh` runs them on the GPU machine);
the CPU test keeps the check's plumbing working here, as its dry run does."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cpu_backbone():
    return gpu_check.toy_backbone("fp32", "cpu")


def test_the_check_compares_a_method_cpu_against_cpu_exactly(cpu_backbone):
    row = gpu_check.parity("coop", cpu_backbone, cpu_backbone)
    assert row["ok"] and not row["stochastic"], row
    assert row["logits"] == row["loss"] == row["step"] == 0.0


@pytest.mark.cuda
@needs_cuda
def test_coop_on_cuda_matches_the_cpu_in_fp32(cpu_backbone):
    with gpu_check.tf32_off():
        row = gpu_check.parity("coop", cpu_backbone, gpu_check.toy_backbone("fp32", "cuda"))
    assert row["ok"], row


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("precision", ["amp", "bf16"])
def test_coop_steps_under_amp_and_bf16_stay_finite(precision):
    row = gpu_check.precision_steps("coop", gpu_check.toy_backbone(precision, "cuda"), 5)
    assert row["ok"], row  # finite losses, parameters moved (not every step skipped), a positive scale
    assert row["scaler"] == (precision == "amp")
