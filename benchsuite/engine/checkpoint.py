"""Epoch checkpoints: a training job's resumable state in one job-private file.

Full-benchmark jobs train for up to an hour on clusters that pre-empt and time out. At every epoch
boundary the loop hands its state here (learnable module state, optimizer, the next epoch, which
fixes the schedule position, every RNG the loop draws from, and each plugin's answer to the
`training_state` hook: what a method, or the harness's test-set model selection, keeps outside the
module, such as PromptSRC's running aggregation sum or ProDA's prompt-order generator); it is kept
in memory as a detached CPU copy and written every `every` epochs, atomically (temporary file +
rename), to `<results>/_checkpoints/<job id>.pt`. A pre-emption signal (SIGTERM, or SIGUSR1,
benchsuite's pre-emption warning) only sets a flag: the loop acts on it between two steps, where it
writes the last boundary and stops the job, so a signal that arrives while a checkpoint is being
written never re-enters the write (it once did, on the same temporary file, and left an unreadable
checkpoint behind). Every write goes to its own temporary file, named after host and process so an
orphan of a killed writer is swept (`benchsuite.tempfiles`), and removed when the write fails. A
checkpoint that cannot be read back (cut by a full disk, a kill outside benchsuite, another torch)
is named, moved aside to `<job id>.pt.unreadable-<time>` and the job restarts from scratch with a
warning, instead of failing every rerun. A restarted job restores it,
hands every plugin its state back (`load_training_state`) and continues with the same RNG stream,
so its result equals an uninterrupted run's (exactly, on CPU with in-process data loading). The
runner deletes the file once the job's result is written.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pluggy
import torch

from ..errors import ContractError, Preempted
from ..tempfiles import temp_path

#: signals that save the last epoch boundary and stop the job (outside Slurm/submitit)
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_ACTIVE: "EpochCheckpoint | None" = None  # the checkpoint of the job training in this process


def copy_state(obj: Any) -> Any:
    """A detached CPU copy of nested state (tensors cloned), so later steps cannot change it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: copy_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(copy_state(v) for v in obj)
    return obj


#: leaf types of a plugin's training state: what `torch.load(weights_only=True)` reads back
_PLAIN = (str, int, float, bool, type(None))


def _check_plain(obj: Any, where: str, path: str = "state") -> None:
    """Refuse, at the first epoch boundary, a training state a resumed job could not load."""
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN:
        return
    if type(obj) is dict:
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise ContractError(f"{where}: key {key!r} of {path} is a {type(key).__name__}; use str or int keys")
            _check_plain(value, where, f"{path}[{key!r}]")
        return
    if type(obj) in (list, tuple):
        for index, value in enumerate(obj):
            _check_plain(value, where, f"{path}[{index}]")
        return
    raise ContractError(f"{where}: {path} is a {type(obj).__module__}.{type(obj).__qualname__}; return tensors "
                        f"and plain Python data only (dict, list, tuple, str, int, float, bool, None), which the "
                        f"checkpoint reads back with torch.load(weights_only=True)")


def training_states(pm: pluggy.PluginManager) -> dict[str, dict[str, Any]]:
    """Every plugin's answer to the `training_state` hook, by plugin name (None answers left out).

    By name, not as pluggy's list of answers, so each state goes back to the plugin that gave it
    (the method and the harness's best-test-epoch selection both keep some)."""
    loaders = {impl.plugin_name for impl in pm.hook.load_training_state.get_hookimpls()}
    states = {}
    for impl in pm.hook.training_state.get_hookimpls():
        state = impl.function()
        if state is None:
            continue
        where = f"plugin {impl.plugin_name!r}, hook training_state"
        if type(state) is not dict:
            raise ContractError(f"{where}: must return a dict or None, got {type(state).__name__}")
        if impl.plugin_name not in loaders:
            raise ContractError(f"{where}: returns state, but the plugin does not implement load_training_state, "
                                f"so a resumed job would lose it")
        _check_plain(state, where)
        states[impl.plugin_name] = state
    return states


def load_training_states(pm: pluggy.PluginManager, states: dict[str, dict[str, Any]]) -> None:
    """Hand each plugin the state it saved (on resume, after module, optimizer and RNGs)."""
    impls = {impl.plugin_name: impl for impl in pm.hook.load_training_state.get_hookimpls()}
    for name, state in states.items():
        if name not in impls:
            raise ContractError(f"the epoch checkpoint holds training state of plugin {name!r}, which this job "
                                f"does not register with a load_training_state hook")
        impls[name].function(state=state)


def rng_state() -> dict[str, Any]:
    """Every generator the training loop draws from (numpy's as tensors, loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


class EpochCheckpoint:
    """The resumable state of one training job (see the module docstring)."""

    def __init__(self, path: Path | str, every: int = 1, *, warn: Callable[[str], None] | None = None) -> None:
        if every < 1:
            raise ValueError("checkpoint interval must be at least 1 epoch")
        self.path = Path(path)
        self.every = every
        self.warn = warn or (lambda message: print(message, flush=True))
        self.resumed = 0  # how many times this job's training continued from a saved checkpoint
        self._snapshot: dict[str, Any] | None = None
        self._signalled: int | None = None  # the pre-emption signal received, acted on between steps
        self._writes = 0  # numbers each write's own temporary file

    # ---- the training loop's side ------------------------------------------------------------
    def restore(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """Load the saved state into module and optimizer and the RNGs; None when there is none.
        Returns the snapshot (its `epoch` is the next epoch to run, plus `seconds`, `images`, `extra`
        and `training_state`, for `load_training_states`). An unreadable checkpoint is moved aside
        (named in a warning) and None returned: the job trains from scratch."""
        if not self.path.exists():
            return None
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
            _check_layout(blob, module)
        except Exception as exc:  # torch raises RuntimeError, EOFError, OSError(EINVAL)... on a cut file
            self._move_aside(exc)
            return None
        pristine = copy_state(module.state_dict())
        try:
            module.load_state_dict(blob["module"], strict=True)
            optimizer.load_state_dict(blob["optimizer"])
            set_rng_state(blob["rng"])
        except Exception as exc:  # a checkpoint of another recipe or torch: start afresh, unchanged
            module.load_state_dict(pristine, strict=True)
            self._move_aside(exc)
            return None
        self.resumed = int(blob["resumed"]) + 1
        blob["resumed"] = self.resumed
        self._snapshot = blob
        return blob

    def _move_aside(self, exc: BaseException) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.unreadable-{stamp}")
        try:
            os.replace(self.path, aside)
            where = f"moved aside to {aside}"
        except OSError as move_error:
            with contextlib.suppress(OSError):
                self.path.unlink()
            where = f"removed (it could not be moved aside: {move_error.strerror})"
        self.warn(f"benchsuite: WARNING: epoch checkpoint {self.path} cannot be read ({type(exc).__name__}: "
                  f"{str(exc)[:200]}); {where}; the job trains again from scratch")

    def epoch_done(self, epoch: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                   seconds: float, images: int, extra: dict[str, Any] | None = None,
                   training_state: dict[str, Any] | None = None) -> None:
        """Record the boundary after `epoch` epochs (kept in memory for a signal); write it to disk
        every `every` epochs. `training_state`: the plugins' non-module state (`training_states`)."""
        self._snapshot = {"epoch": epoch, "module": copy_state(module.state_dict()),
                          "optimizer": copy_state(optimizer.state_dict()), "rng": copy_state(rng_state()),
                          "seconds": float(seconds), "images": int(images), "resumed": self.resumed,
                          "extra": copy_state(extra or {}), "training_state": copy_state(training_state or {})}
        if epoch % self.every == 0:
            self.save()
        self.stop_if_signalled()

    def stop_if_signalled(self) -> None:
        """Between two steps: if a pre-emption signal arrived, write the last boundary and stop the
        job (Preempted). A host-side flag test: no device work, no sync."""
        if self._signalled is None:
            return
        signum, self._signalled = self._signalled, None
        saved = self.save()
        epoch = self._snapshot["epoch"] if saved and self._snapshot else 0
        raise Preempted(f"received {signal.Signals(signum).name}: "
                        + (f"checkpoint saved after epoch {epoch} ({self.path})" if saved
                           else "no epoch finished yet, nothing to save"))

    # ---- the executor's side -----------------------------------------------------------------
    def save(self) -> bool:
        """Write the last epoch boundary atomically; False when no epoch has finished yet.

        Re-entrancy-safe: every call writes its own temporary file (a call from submitit's signal
        handler may interrupt one in progress), removed if the write does not finish."""
        snapshot = self._snapshot
        if snapshot is None:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writes += 1
        tmp = temp_path(self.path, tag=f"ckpt{self._writes}")
        try:
            torch.save(snapshot, tmp)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return True

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    @contextlib.contextmanager
    def active(self, signals: tuple[int, ...] = PREEMPT_SIGNALS) -> Iterator["EpochCheckpoint"]:
        """Mark this job's checkpoint as the process's active one (what a submitit `checkpoint`
        saves) and make each of `signals` stop the job at the next step boundary, after saving
        the last epoch boundary (handlers installed in the main thread only)."""
        global _ACTIVE
        _ACTIVE = self
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            _ACTIVE = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        """Only record the signal: writing here could interrupt a write of the same checkpoint."""
        self._signalled = signum


def _check_layout(blob: Any, module: torch.nn.Module) -> None:
    """Refuse a checkpoint that does not hold this module's state (before anything is loaded)."""
    if not isinstance(blob, dict) or not {"module", "optimizer", "rng", "epoch", "resumed"} <= set(blob):
        raise ValueError("not an epoch checkpoint of benchsuite (keys missing)")
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in blob["module"].items()}
    if saved != expected:
        raise ValueError("it holds the state of another module (parameter names or shapes differ)")


def save_active() -> bool:
    """Write the active job's last epoch boundary (called from submitit's pre-emption handler)."""
    return _ACTIVE.save() if _ACTIVE is not None else False
