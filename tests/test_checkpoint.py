"""Epoch checkpoints: an interrupted training job resumes and ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import pluggy
import pytest
import torch

from benchsuite.engine.checkpoint import (EpochCheckpoint, load_training_states, rng_state, set_rng_state,
                                          training_states)
from benchsuite.engine.runner import BestTestEpoch, Runner
from benchsuite.errors import ContractError
from benchsuite.hookspecs import PROJECT, MethodSpec, hookimpl
from benchsuite.methods import get_method
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


def _stop_at(monkeypatch, stop: int, action, method: str = "coop"):
    """Make the method's first step of epoch index `stop` perform `action` (send a signal, crash)."""
    cls = get_method(method).cls
    original = cls.train_step
    fired = []

    @hookimpl
    def train_step(self, batch, epoch):
        if epoch == stop and not fired:
            fired.append(epoch)
            action()
        return original(self, batch, epoch)

    monkeypatch.setattr(cls, "train_step", train_step)
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


# --------------------------------------------------------------------------------------------------
# state kept outside the module: the training_state / load_training_state hooks


def _method_args(results, tiny_checkpoint, data_root, method: str, *settings: str) -> list[str]:
    return run_args("cross_dataset", tiny_checkpoint, data_root, results, "--method", method, "--seeds", "1",
                    "--no-feature-cache", "--set", f"epochs={EPOCHS}", *settings)


def _completed(args: list[str], results):
    """Run to the end; the one result and the trained (shared) state."""
    code, out, err = run_quiet(args)
    assert code == 0, out + err
    (result,) = load_results(results).values()
    return result, _trained_state(results)


def _signalled_at(monkeypatch, stop_epoch: int, args: list[str], method: str) -> None:
    """Run `args` until SIGUSR1 at the first step of epoch index `stop_epoch` (its checkpoint saved)."""
    with monkeypatch.context() as patch:
        _stop_at(patch, stop_epoch, lambda: os.kill(os.getpid(), signal.SIGUSR1), method)
        code, out, err = run_quiet(args)
    assert code == 143 and f"checkpoint saved after epoch {stop_epoch}" in err, out + err


def _assert_same_training(result, state, reference, reference_state) -> None:
    assert result["timing"]["train_resumed"] == 1
    assert result["metrics"] == reference["metrics"]
    assert state.keys() == reference_state.keys()
    for key in state:
        assert torch.allclose(state[key], reference_state[key], atol=1e-6, rtol=0), key


@pytest.mark.parametrize("method,settings", [
    ("promptsrc", ["promptsrc.gpa_mean=2", "promptsrc.gpa_std=1"]),  # the epochs before the stop weigh in GPA
    ("proda", []),
])
def test_a_resumed_job_keeps_the_state_its_method_holds_outside_the_module(method, settings, monkeypatch, tmp_path,
                                                                          tiny_checkpoint, data_root):
    """PromptSRC's running GPA sum and ProDA's prompt-order generator and permutation are Python
    attributes: through training_state they survive a stop after epoch 2 of 4, so the aggregated
    (PromptSRC) or trained (ProDA) prompts and the metrics equal the uninterrupted run's."""
    reference = _completed(_method_args(tmp_path / "plain", tiny_checkpoint, data_root, method, *settings),
                           tmp_path / "plain")
    args = _method_args(tmp_path / "resumed", tiny_checkpoint, data_root, method, *settings)
    _signalled_at(monkeypatch, 2, args, method)
    _assert_same_training(*_completed(args, tmp_path / "resumed"), *reference)


def test_best_test_epoch_selection_survives_a_resume(monkeypatch, tmp_path, tiny_checkpoint, data_root):
    """Every epoch scores the same (a constant scorer), so the first epoch's state is selected; a job
    resumed after epoch 2 still knows that best score and state instead of taking epoch 3's."""
    monkeypatch.setattr(Runner, "_first_eval_scorer", lambda self, *args: (lambda: 50.0))
    settings = ("coop.model_selection=best_test_epoch",)
    reference = _completed([*_method_args(tmp_path / "plain", tiny_checkpoint, data_root, "coop", *settings),
                            "--allow-model-selection"], tmp_path / "plain")
    args = [*_method_args(tmp_path / "resumed", tiny_checkpoint, data_root, "coop", *settings),
            "--allow-model-selection"]
    _signalled_at(monkeypatch, 2, args, "coop")
    _assert_same_training(*_completed(args, tmp_path / "resumed"), *reference)


class _Counter:
    """A plugin with training state outside any module: a step count, a tensor, plain nested data."""

    def __init__(self) -> None:
        self.steps, self.history, self.notes = 0, torch.zeros(0), []

    @hookimpl
    def training_state(self):
        return {"steps": self.steps, "history": self.history, "notes": self.notes}

    @hookimpl
    def load_training_state(self, state):
        self.steps, self.history, self.notes = state["steps"], state["history"], state["notes"]


def _job_pm(**plugins) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(MethodSpec)
    for name, plugin in plugins.items():
        pm.register(plugin, name=name)
    return pm


def test_training_states_round_trip_through_a_weights_only_checkpoint_by_plugin_name(tmp_path):
    module = torch.nn.Linear(2, 1, bias=False)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    counter, selector = _Counter(), BestTestEpoch(lambda: 7.0, module)
    counter.steps, counter.history, counter.notes = 3, torch.arange(3.0), ["a", ("b", 1.5, None, True), {"k": 2}]
    selector.epoch_end(epoch=0, num_epochs=3)
    best = module.weight.detach().clone()
    ckpt = EpochCheckpoint(tmp_path / "c.pt")
    ckpt.epoch_done(1, module, optimizer, seconds=1.0, images=4,
                    training_state=training_states(_job_pm(method=counter, selector=selector)))
    counter.history += 1  # the checkpoint holds a detached copy

    fresh, fresh_selector = _Counter(), BestTestEpoch(lambda: 1.0, module)
    blob = EpochCheckpoint(tmp_path / "c.pt").restore(module, optimizer)  # torch.load(weights_only=True)
    assert set(blob["training_state"]) == {"method", "selector"}
    load_training_states(_job_pm(method=fresh, selector=fresh_selector), blob["training_state"])
    assert fresh.steps == 3 and torch.equal(fresh.history, torch.arange(3.0))
    assert fresh.notes == ["a", ("b", 1.5, None, True), {"k": 2}]
    with torch.no_grad():
        module.weight.add_(1.0)
    fresh_selector.epoch_end(epoch=1, num_epochs=3)  # scores 1.0 < 7.0: epoch 1 stays the best
    fresh_selector.train_end()
    assert fresh_selector.best == 7.0 and torch.equal(module.weight, best)


def test_training_state_a_resume_could_not_load_is_refused_at_the_first_boundary():
    class NumpyState(_Counter):
        @hookimpl
        def training_state(self):
            return {"mean": np.float64(0.5)}

    class NoLoader:
        @hookimpl
        def training_state(self):
            return {"steps": 1}

    with pytest.raises(ContractError, match=r"plugin 'm', hook training_state: state\['mean'\] is a numpy.float64.*"
                                            r"weights_only"):
        training_states(_job_pm(m=NumpyState()))
    with pytest.raises(ContractError, match="does not implement load_training_state"):
        training_states(_job_pm(m=NoLoader()))
    with pytest.raises(ContractError, match="training state of plugin 'gone'"):
        load_training_states(_job_pm(m=_Counter()), {"gone": {"steps": 1}})
    assert list(training_states(_job_pm(m=_Counter(), plain=object()))) == ["m"]  # a plugin without the hook: nothing


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


# --------------------------------------------------------------------------------------------------
# signals during a write, unreadable checkpoints, temporary files of killed writes

def _tiny_training():
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    module(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return module, optimizer


def test_a_signal_during_a_checkpoint_write_never_reenters_the_write(monkeypatch, tmp_path):
    """SIGUSR1 arrives in the middle of torch.save: the write finishes undisturbed (no second,
    nested write of the same checkpoint), then the job stops with the checkpoint readable."""
    from benchsuite.engine import checkpoint as checkpoint_module
    from benchsuite.errors import Preempted

    real_save, depth, deepest = torch.save, [0], [0]

    def save_interrupted(obj, f, *args, **kwargs):
        depth[0] += 1
        deepest[0] = max(deepest[0], depth[0])
        try:
            if depth[0] == 1:
                os.kill(os.getpid(), signal.SIGUSR1)  # Python runs the handler right here, mid-write
            return real_save(obj, f, *args, **kwargs)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(checkpoint_module.torch, "save", save_interrupted)
    module, optimizer = _tiny_training()
    ckpt = EpochCheckpoint(tmp_path / "c.pt")
    with ckpt.active((signal.SIGUSR1,)):
        with pytest.raises(Preempted, match="checkpoint saved after epoch 1"):
            ckpt.epoch_done(1, module, optimizer, seconds=1.0, images=4)
    assert deepest[0] == 1, "the signal handler wrote the checkpoint inside the interrupted write"
    monkeypatch.undo()
    blob = torch.load(tmp_path / "c.pt", weights_only=True)
    assert blob["epoch"] == 1 and torch.equal(blob["module"]["weight"], module.weight.detach())
    assert temp_files(tmp_path) == []


def test_a_failed_checkpoint_write_leaves_no_temporary_file_and_names_it_for_the_orphan_sweep(monkeypatch, tmp_path):
    """A write that fails (full disk) removes its temporary file; one of a killed writer carries host
    and pid, which is what `benchsuite.tempfiles.sweep_orphans` needs to remove it later."""
    from benchsuite.engine import checkpoint as checkpoint_module
    from benchsuite.tempfiles import is_orphan

    written = []

    def full_disk(obj, f, *args, **kwargs):
        written.append(Path(f))
        Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    module, optimizer = _tiny_training()
    ckpt = EpochCheckpoint(tmp_path / "c.pt")
    with pytest.raises(OSError):
        ckpt.epoch_done(1, module, optimizer, seconds=1.0, images=4)
    assert temp_files(tmp_path) == [] and not (tmp_path / "c.pt").exists()
    (tmp,) = written
    monkeypatch.setattr("benchsuite.tempfiles.pid_alive", lambda pid: False)  # as if its writer was killed
    assert is_orphan(tmp)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other_module"])
def test_an_unreadable_checkpoint_is_named_moved_aside_and_the_job_trains_from_scratch(
        damage, monkeypatch, tmp_path, tiny_checkpoint, data_root, uninterrupted):
    reference, reference_state = uninterrupted
    results = tmp_path / "results"
    args = run_args("cross_dataset", tiny_checkpoint, data_root, results, *COMMON)
    _signalled_at(monkeypatch, 2, args, "coop")
    (saved,) = (results / "_checkpoints").glob("*.pt")
    if damage == "truncated":
        saved.write_bytes(saved.read_bytes()[:200])
    elif damage == "garbage":
        saved.write_bytes(b"\0" * 64)
    else:
        blob = torch.load(saved, weights_only=True)
        blob["module"] = {"ctx": torch.zeros(1, 2)}
        torch.save(blob, saved)
    code, out, err = run_quiet(args)
    assert code == 0, out + err
    assert f"epoch checkpoint {saved} cannot be read" in out + err and "Traceback" not in err
    (aside,) = (results / "_checkpoints").glob("*.unreadable-*")
    assert aside.name.startswith(saved.name)
    (result,) = load_results(results).values()
    assert result["timing"]["train_resumed"] == 0  # trained from scratch: the same as never interrupted
    assert result["metrics"] == reference["metrics"]
    assert torch.allclose(_trained_state(results)["ctx"], reference_state["ctx"], atol=1e-6, rtol=0)
