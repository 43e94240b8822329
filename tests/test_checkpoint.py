"""Epoch checkpoints: an interrupted training job resumes and ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import random
import signal

import numpy as np
import pytest
import torch

from benchsuite.engine.checkpoint import EpochCheckpoint, rng_state, set_rng_state
from benchsuite.hookspecs import hookimpl
from test_run import load_results, result_files, run_args, run_quiet, temp_files

EPOCHS = 4
COMMON = ["--method", "coop", "--seeds", "1", "--set", f"epochs={EPOCHS}", "--no-feature-cache"]


def _trained_state(results):
    (shared,) = sorted((results / "_trained").glob("*.pt"))
    return torch.load(shared, weights_only=True)["state"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_checkpoint, data_root):
    results = tmp_path_factory.mktemp("ckpt") / "plain"
    code, out, err = run_quiet(run_args("cross_dataset", tiny_checkpoint, data_root, results, *COMMON))
    assert code == 0, out + err
    (result,) = load_results(results).values()
    assert result["timing"]["train_resumed"] == 0
    return result, _trained_state(results)


def _stop_at(monkeypatch, stop: int, action):
    """Make CoOp's first step of epoch index `stop` perform `action` (send a signal, crash)."""
    from benchsuite_plugins.coop import CoOp

    original = CoOp.train_step
    fired = []

    @hookimpl
    def train_step(self, batch, epoch):
        if epoch == stop and not fired:
            fired.append(epoch)
            action()
        return original(self, batch, epoch)

    monkeypatch.setattr(CoOp, "train_step", train_step)
    return fired


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_a_signalled_job_saves_its_epoch_and_resumes_to_the_same_result(signum, monkeypatch, tmp_path,
                                                                         tiny_checkpoint, data_root, uninterrupted):
    reference, reference_state = uninterrupted
    results = tmp_path / "results"
    args = run_args("cross_dataset", tiny_checkpoint, data_root, results, *COMMON)
    checkpoints = results / "_checkpoints"

    for stop_epoch in (1, 3):  # interrupted twice: after 1 epoch, then (resumed) after 3
        _stop_at(monkeypatch, stop_epoch, lambda: os.kill(os.getpid(), signum))
        code, out, err = run_quiet(args)
        monkeypatch.undo()
        assert code == 143, out + err
        assert f"checkpoint saved after epoch {stop_epoch}" in err and "Traceback" not in err
        assert result_files(results) == []
        (saved,) = checkpoints.glob("*.pt")
        assert torch.load(saved, weights_only=True)["epoch"] == stop_epoch
        assert temp_files(results) == []
    assert signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler)  # handlers restored

    code, out, err = run_quiet(args)
    assert code == 0, out + err
    (result,) = load_results(results).values()
    assert result["timing"]["train_resumed"] == 2
    assert result["metrics"] == reference["metrics"]
    assert result["job"]["id"] == reference["job"]["id"]
    assert result["timing"]["train_images"] == reference["timing"]["train_images"]
    state = _trained_state(results)
    assert torch.allclose(state["ctx"], reference_state["ctx"], atol=1e-6, rtol=0)
    assert list(checkpoints.glob("*")) == []  # removed once the result is written


def test_a_crashed_job_resumes_from_its_last_written_checkpoint(monkeypatch, tmp_path, tiny_checkpoint, data_root,
                                                                uninterrupted):
    """With --checkpoint-every 2, a crash in epoch 4 (index 3) leaves the checkpoint of epoch 2."""
    reference, reference_state = uninterrupted
    results = tmp_path / "results"
    args = run_args("cross_dataset", tiny_checkpoint, data_root, results, *COMMON, "--checkpoint-every", "2")

    def crash():  # --fail-fast: the crash stops the process, as a killed job would
        raise RuntimeError("simulated crash")

    _stop_at(monkeypatch, 3, crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_quiet([*args, "--fail-fast"])
    monkeypatch.undo()
    (saved,) = (results / "_checkpoints").glob("*.pt")
    assert torch.load(saved, weights_only=True)["epoch"] == 2
    code, out, err = run_quiet(args)
    assert code == 0, out + err
    (result,) = load_results(results).values()
    assert result["timing"]["train_resumed"] == 1
    assert result["metrics"] == reference["metrics"]
    assert torch.allclose(_trained_state(results)["ctx"], reference_state["ctx"], atol=1e-6, rtol=0)


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    path = tmp_path / "rng.pt"
    torch.save(rng_state(), path)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(path, weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_save_before_any_epoch_writes_nothing_and_the_interval_is_validated(tmp_path):
    ckpt = EpochCheckpoint(tmp_path / "c.pt")
    assert ckpt.save() is False and not (tmp_path / "c.pt").exists()
    with pytest.raises(ValueError):
        EpochCheckpoint(tmp_path / "c.pt", every=0)


def test_bad_checkpoint_interval_is_one_clear_line(tmp_path, tiny_checkpoint, data_root):
    code, out, err = run_quiet(run_args("cross_dataset", tiny_checkpoint, data_root, tmp_path / "r", *COMMON,
                                        "--checkpoint-every", "0"))
    assert code == 2 and "--checkpoint-every" in err and "Traceback" not in err
    assert json.dumps(err).count("\\n") == 1
