"""The plugin contract: an out-of-tree method installed with pip, and contract errors.

The out-of-tree distribution lives in tests/oot_plugin (its own pyproject.toml and name). The test
pip-installs it in editable mode, runs the real CLI in subprocesses (fresh entry-point discovery),
and uninstalls it again. A file lock and an uninstall-first make a second run, or a run after an
interrupted one, safe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import filelock
import pytest
import torch

import benchsuite.methods as methods_module
from benchsuite.cli import main
from benchsuite.errors import ContractError
from benchsuite.hookspecs import Method, hookimpl
from benchsuite.methods import MethodEntry, job_manager
from benchsuite.protocols import load_protocol
from fixture_data import EXPECTED, TRAIN_COUNTS

TESTS = Path(__file__).resolve().parent
PLUGIN_DIR = TESTS / "oot_plugin"
DIST = "benchsuite-oot-example"
MODEL_CONFIG = TESTS / "model_configs" / "bs-tiny-test.json"

RUNNER = """\
import sys

import open_clip

open_clip.add_model_config(sys.argv[1])  # the tiny test architecture, unknown to open_clip otherwise
from benchsuite.cli import main

sys.exit(main(sys.argv[2:]))
"""


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def oot_installed():
    """The example distribution, pip-installed (editable) for this module only."""
    lock = filelock.FileLock(str(Path(tempfile.gettempdir()) / "benchsuite-oot-plugin-test.lock"))
    with lock:  # concurrent runs of this module take turns
        _pip("uninstall", "-y", DIST)  # leftover of an interrupted earlier run: not an error if absent
        out = _pip("install", "--no-deps", "--no-build-isolation", "-e", str(PLUGIN_DIR))
        assert out.returncode == 0, f"pip install of {PLUGIN_DIR} failed:\n{out.stdout}\n{out.stderr}"
        try:
            yield DIST
        finally:
            _pip("uninstall", "-y", DIST)
            methods_module.discover.cache_clear()  # no in-process caller keeps seeing the removed plugin
            methods_module.plugins.cache_clear()


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["BENCHSUITE_CACHE"] = str(tmp_path / "cache")  # never the user's feature cache
    env.pop("PYTHONPATH", None)  # benchsuite and the plugin must come from the installed distributions
    return env


def test_oot_method_is_listed(oot_installed, tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchsuite.cli", "list", "methods"], capture_output=True,
                         text=True, cwd=tmp_path, env=_env(tmp_path), timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.strip()}
    assert "oot_linear" in rows, out.stdout
    assert DIST in rows["oot_linear"] and "0.1.0" in rows["oot_linear"]
    assert "builtin" in rows["coop"] and "builtin" in rows["zeroshot_clip"]


def test_oot_method_runs_a_protocol_job(oot_installed, tmp_path, tiny_checkpoint, data_root):
    from benchsuite.results.validate import validate_result

    script = tmp_path / "run_benchsuite.py"
    script.write_text(RUNNER, encoding="utf-8")
    results = tmp_path / "results"
    args = ["run", "--protocol", "base2new", "--method", "oot_linear", "--dataset", "eurosat", "--seeds", "1",
            "--backbone", "bs-tiny-test", "--pretrained", str(tiny_checkpoint), "--data-root", str(data_root),
            "--results", str(results), "--feature-cache", str(tmp_path / "features")]
    out = subprocess.run([sys.executable, str(script), str(MODEL_CONFIG), *args], capture_output=True, text=True,
                         cwd=tmp_path, env=_env(tmp_path), timeout=600)
    assert out.returncode == 0, f"stdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    files = sorted((results / "base2new" / "oot_linear" / "eurosat").glob("*.json"))
    assert len(files) == 1, out.stdout
    result = json.loads(files[0].read_text(encoding="utf-8"))
    assert validate_result(result) == []
    assert result["job"]["method"] == result["method"]["name"] == "oot_linear"
    assert result["method"]["source"] == DIST
    assert result["method"]["default_recipe"] is True
    assert result["method"]["recipe"]["epochs"] == 3  # the plugin's own recipe drove the loop
    assert result["method"]["trainable_params"] == 32 * 32 + 1
    n_classes = len(EXPECTED["eurosat"].classnames)
    base = (n_classes + 1) // 2
    n_train = sum(min(16, TRAIN_COUNTS[label]) for label in range(base))
    assert result["timing"]["train_images"] == 3 * n_train
    assert result["timing"]["train_seconds"] > 0
    assert set(result["metrics"]) == {"base", "new"}
    assert result["data"]["evals"]["new"]["n_classes"] == n_classes - base


# --------------------------------------------------------------------------------------------------
# contract errors, reported with the method and the hook


class Good(Method):
    name = "good_method"
    summary = "complete minimal method"

    @hookimpl
    def recipe(self, protocol, dataset, shots):
        return {"epochs": 0}

    @hookimpl
    def prepare_eval(self, classnames, dataset, template):
        self.n = len(classnames)

    @hookimpl
    def predict(self, batch):
        return torch.zeros(batch.labels.shape[0], self.n)


class ExtraArgument(Good):
    name = "extra_argument"

    @hookimpl
    def predict(self, batch, temperature):
        return torch.zeros(batch.labels.shape[0], self.n) / temperature


class ExtraTrainArgument(Good):
    name = "extra_train_argument"

    @hookimpl
    def train_step(self, batch, epoch, optimizer):
        return {"loss": torch.zeros(())}


class Misspelled(Good):
    name = "misspelled"

    @hookimpl
    def trian_step(self, batch, epoch):
        return {"loss": torch.zeros(())}


class NoPredict(Method):
    name = "no_predict"

    @hookimpl
    def recipe(self, protocol, dataset, shots):
        return {"epochs": 0}

    @hookimpl
    def prepare_eval(self, classnames, dataset, template):
        pass


class NoRecipe(Method):
    name = "no_recipe"

    @hookimpl
    def prepare_eval(self, classnames, dataset, template):
        pass

    @hookimpl
    def predict(self, batch):
        return batch.labels


class NeedsArguments(Good):
    name = "needs_arguments"

    def __init__(self, width):
        self.width = width


def entry(cls) -> MethodEntry:
    return MethodEntry(cls.name, cls, "tests-dist", "0.0", cls.name)


def test_a_complete_method_registers():
    pm, instance = job_manager(entry(Good))
    assert isinstance(instance, Good)
    assert pm.hook.recipe(protocol=load_protocol("base2new"), dataset="dtd", shots=16) == {"epochs": 0}
    assert pm.hook.train_views(image_spec=None) == []  # harness default: no extra views


@pytest.mark.parametrize("cls,hook,detail", [
    (ExtraArgument, "predict", "temperature"),
    (ExtraTrainArgument, "train_step", "optimizer"),
    (Misspelled, "trian_step", None),
    (NoPredict, "predict", None),
    (NoRecipe, "recipe", None),
    (NeedsArguments, "NeedsArguments", "width"),
])
def test_contract_errors_name_method_and_hook(cls, hook, detail):
    with pytest.raises(ContractError) as info:
        job_manager(entry(cls))
    message = str(info.value)
    assert repr(cls.name) in message, message
    assert hook in message, message
    assert "tests-dist" in message, message
    if detail:
        assert detail in message, message


# --------------------------------------------------------------------------------------------------
# contract errors found while running a job: the job fails with method and hook named (exit 1 at
# the end of the grid, traceback logged); with --fail-fast the run stops at once (exit 2)


class TrainsWithoutTrainStep(Good):
    name = "trains_without_train_step"

    @hookimpl
    def recipe(self, protocol, dataset, shots):
        return {"epochs": 2}


class WrongLogits(Good):
    name = "wrong_logits"

    @hookimpl
    def predict(self, batch):
        return torch.zeros(batch.labels.shape[0], self.n + 1)


class SetupReturnsNothing(Good):
    name = "setup_returns_nothing"

    @hookimpl
    def setup(self, ctx):
        return "not a module"


@pytest.mark.parametrize("cls,expected", [
    (TrainsWithoutTrainStep, "train_step"),
    (WrongLogits, "predict"),
    (SetupReturnsNothing, "setup"),
])
@pytest.mark.parametrize("fail_fast", [False, True], ids=["grid-goes-on", "fail-fast"])
def test_contract_errors_while_running(cls, expected, fail_fast, monkeypatch, capsys, tmp_path, tiny_checkpoint,
                                       data_root):
    found = {cls.name: entry(cls)}
    monkeypatch.setattr(methods_module, "discover", lambda: found)
    code = main(["run", "--protocol", "base2new", "--method", cls.name, "--dataset", "eurosat", "--seeds", "1",
                 "--backbone", "bs-tiny-test", "--pretrained", str(tiny_checkpoint), "--data-root", str(data_root),
                 "--results", str(tmp_path / "results"), "--feature-cache", str(tmp_path / "features"),
                 *(["--fail-fast"] if fail_fast else [])])
    err = capsys.readouterr().err
    assert code == (2 if fail_fast else 1), err
    assert repr(cls.name) in err and expected in err, err
    assert "Traceback" not in err
    assert not list((tmp_path / "results").rglob("base2new/**/*.json"))
    logs = list((tmp_path / "results" / "_logs").rglob("*.log"))
    assert len(logs) == (0 if fail_fast else 1)


class ViewsMethod(Method):
    """Asks for two extra views (one flipped, one grey) and records what the harness delivers."""

    name = "views_probe"
    image_input = "images"
    seen: list = []

    @hookimpl
    def recipe(self, protocol, dataset, shots):
        return {"epochs": 1, "batch_size": 4, "warmup_epochs": 0}

    @hookimpl
    def setup(self, ctx):
        self.backbone = ctx.backbone
        self.bias = torch.nn.Parameter(torch.zeros(len(ctx.classnames)))
        module = torch.nn.Module()
        module.bias = self.bias
        return module

    @hookimpl
    def train_views(self, image_spec):
        from torchvision import transforms as T

        size = image_spec.size
        base = [T.Resize((size, size)), T.ToTensor()]
        return [T.Compose([T.RandomHorizontalFlip(1.0), *base]), T.Compose([T.Grayscale(3), *base])]

    @hookimpl
    def train_step(self, batch, epoch):
        ViewsMethod.seen.append((batch.images.shape, [v.shape for v in batch.views], batch.image_features))
        return {"loss": (self.bias ** 2).sum() + batch.images.mean() * 0}

    @hookimpl
    def prepare_eval(self, classnames, dataset, template):
        self.n = len(classnames)

    @hookimpl
    def predict(self, batch):
        return torch.zeros(batch.labels.shape[0], self.n) + self.bias[: self.n]


def test_extra_views_reach_train_step_batched_and_images_are_not_encoded(tmp_path, tiny_backbone, data_root):
    from benchsuite.engine.jobs import Job
    from benchsuite.engine.runner import Runner

    ViewsMethod.seen.clear()
    runner = Runner(tiny_backbone, data_root, tmp_path / "r", manifests_root=tmp_path / "m", echo=lambda *_: None)
    original = methods_module.get_method
    try:
        import benchsuite.engine.runner as runner_module

        runner_module.get_method = lambda name: entry(ViewsMethod) if name == "views_probe" else original(name)
        runner.run_job(Job(load_protocol("base2new"), "views_probe", "oxford_pets", 16, 1))
    finally:
        runner_module.get_method = original
    assert ViewsMethod.seen
    images_shape, view_shapes, features = ViewsMethod.seen[0]
    size = tiny_backbone.image_spec.size
    assert view_shapes == [images_shape, images_shape] and tuple(images_shape[1:]) == (3, size, size)
    assert features is None  # image_input = "images": the harness does not encode images for it
