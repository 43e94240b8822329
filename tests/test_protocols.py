"""Frozen protocols (pins), the LR schedule (methods.md 1.3) and the job grid."""

from __future__ import annotations

import hashlib
import json
import math
from importlib import resources
from pathlib import Path

import pytest
import torch

import benchsuite.protocols as protocols
from benchsuite.engine.jobs import expand_grid
from benchsuite.engine.schedule import epoch_lr
from benchsuite.errors import BenchsuiteError, ProtocolError
from benchsuite.protocols import content_hash, load_pins, load_protocol, protocol_ids

SHIPPED = ("base2new", "cross_dataset", "domain_generalization", "few_shot")  # the real protocols


def canonical_sha256(spec: dict) -> str:
    """Restated here: sha256 of the JSON with sorted keys and no whitespace."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def pin_mismatches(folder) -> list[str]:
    """Every protocol file in `folder` whose content hash is not the pin of its version."""
    pins = json.loads((folder / "pins.json").read_text(encoding="utf-8"))
    problems = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".json") or entry.name == "pins.json":
            continue
        pid = entry.name[:-5]
        spec = json.loads(entry.read_text(encoding="utf-8"))
        pinned = pins.get(pid, {}).get(str(spec.get("version")))
        actual = canonical_sha256(spec)
        if pinned != actual:
            problems.append(
                f"protocol {pid!r} version {spec.get('version')} has content hash {actual} but pins.json pins "
                f"{pinned}: the protocol CHANGED WITHOUT A VERSION BUMP. A frozen protocol must not be edited; "
                f"restore it, or bump its 'version' and add the new hash to protocols/pins.json "
                f"(`benchsuite list protocols --hashes`)."
            )
    return problems


def copy_protocols(tmp_path: Path) -> Path:
    folder = tmp_path / "protocols"
    folder.mkdir()
    for entry in resources.files("benchsuite_protocols").iterdir():
        if entry.name.endswith(".json"):
            (folder / entry.name).write_text(entry.read_text(encoding="utf-8"), encoding="utf-8")
    return folder


# --------------------------------------------------------------------------------------------------
# pins


def test_shipped_protocols_include_the_real_ones():
    assert set(SHIPPED) <= set(protocol_ids())


def test_every_shipped_protocol_matches_its_pin():
    """THE guard against editing a frozen protocol: fails when a protocol changes without a version bump."""
    problems = pin_mismatches(resources.files("benchsuite_protocols"))
    assert not problems, "\n".join(problems)


def test_every_pin_names_a_shipped_protocol_version():
    pins = load_pins()
    assert set(pins) == set(protocol_ids())
    for pid in protocol_ids():
        protocol = load_protocol(pid)
        assert pins[pid][str(protocol.version)] == protocol.hash == canonical_sha256(protocol.spec)
        for digest in pins[pid].values():
            assert len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)


def test_pin_check_catches_an_edit(tmp_path):
    """The check above can fail: an edited copy is reported, naming the missing version bump."""
    folder = copy_protocols(tmp_path)
    spec = json.loads((folder / "few_shot.json").read_text())
    spec["shots"] = [1, 2, 4, 8]
    (folder / "few_shot.json").write_text(json.dumps(spec, indent=2))
    problems = pin_mismatches(folder)
    assert len(problems) == 1
    assert "few_shot" in problems[0] and "WITHOUT A VERSION BUMP" in problems[0]


def test_content_hash_is_canonical():
    spec = load_protocol("base2new").spec
    shuffled = dict(reversed(list(spec.items())))
    assert content_hash(shuffled) == content_hash(spec) == canonical_sha256(spec)
    edited = {**spec, "seeds": [1, 2]}
    assert content_hash(edited) != content_hash(spec)


@pytest.fixture
def protocol_copy(tmp_path, monkeypatch) -> Path:
    """load_protocol reads from a writable copy of the shipped protocols."""
    folder = copy_protocols(tmp_path)
    monkeypatch.setattr(protocols, "_files", lambda: folder)
    return folder


def _edit(folder: Path, pid: str, **changes) -> None:
    path = folder / f"{pid}.json"
    spec = json.loads(path.read_text())
    spec.update(changes)
    path.write_text(json.dumps(spec, indent=2))


def test_unedited_copy_loads(protocol_copy):
    assert load_protocol("base2new").hash == load_pins()["base2new"]["1"]


@pytest.mark.parametrize("pid,changes", [
    ("base2new", {"seeds": [1, 2]}),
    ("cross_dataset", {"targets": ["caltech101"]}),
    ("few_shot", {"eval_batch_size": 50}),
    ("domain_generalization", {"description": "edited"}),  # even prose is frozen
])
def test_edit_without_bump_is_refused(protocol_copy, pid, changes):
    _edit(protocol_copy, pid, **changes)
    with pytest.raises(ProtocolError) as info:
        load_protocol(pid)
    message = str(info.value)
    assert pid in message and "version" in message and "pins.json" in message
    load_protocol(pid, verify_pin=False)  # the content itself is fine


def test_bump_without_new_pin_is_refused_and_with_pin_accepted(protocol_copy):
    _edit(protocol_copy, "base2new", seeds=[1, 2], version=2)
    with pytest.raises(ProtocolError, match="base2new"):
        load_protocol("base2new")
    pins = json.loads((protocol_copy / "pins.json").read_text())
    spec = json.loads((protocol_copy / "base2new.json").read_text())
    pins["base2new"]["2"] = canonical_sha256(spec)
    (protocol_copy / "pins.json").write_text(json.dumps(pins, indent=2))
    protocol = load_protocol("base2new")
    assert protocol.version == 2 and protocol.seeds == [1, 2]


def test_unknown_protocol_and_malformed_protocol(protocol_copy):
    with pytest.raises(ProtocolError, match="nope"):
        load_protocol("nope")
    _edit(protocol_copy, "few_shot", id="few_shots")
    with pytest.raises(ProtocolError, match="few_shots"):
        load_protocol("few_shot")


def test_protocol_contents_follow_methods_md():
    b2n, xd, dg, fs = (load_protocol(p) for p in SHIPPED)
    assert b2n.task == "base2new" and b2n.shots == [16] and b2n.seeds == [1, 2, 3]
    assert len(b2n.train_datasets) == 11 and b2n.eval_names == ["base", "new"]
    assert xd.train_datasets == ["imagenet"] and len(xd.spec["targets"]) == 10
    assert dg.eval_names == ["imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
    assert fs.shots == [1, 2, 4, 8, 16] and fs.eval_names == ["test"]
    for p in (b2n, xd, dg, fs):
        assert p.spec["model_selection"] == "last_epoch" and p.spec["eval_batch_size"] == 100
        assert p.profile == {}


# --------------------------------------------------------------------------------------------------
# learning-rate schedule


def test_schedule_examples_of_methods_md():
    eta = 0.002
    five = [epoch_lr(e, 5, eta) for e in range(5)]
    assert five[0] == pytest.approx(1e-5)
    assert [round(lr / eta, 3) for lr in five[1:]] == [1.0, 0.905, 0.655, 0.345]
    two = [epoch_lr(e, 2, eta) for e in range(2)]
    assert two == pytest.approx([1e-5, eta])


def dassl_lrs(epochs: int, eta: float, warmup_lr: float = 1e-5) -> list[float]:
    """Per-epoch LR of Dassl's ConstantWarmupScheduler(CosineAnnealingLR(T_max=E), 1 epoch, 1e-5)
    (dassl/optim/lr_scheduler.py, c61a1b5) with WARMUP_RECOUNT: epoch 0 runs at the constant
    warm-up LR; the wrapped torch cosine then starts at its own step 0 and steps once per epoch."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=eta)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    lrs = [warmup_lr]
    for _ in range(1, epochs):
        lrs.append(cosine.get_last_lr()[0])
        optimizer.step()
        cosine.step()
    return lrs


@pytest.mark.parametrize("epochs", [2, 3, 5, 10, 50, 200])
def test_schedule_matches_the_dassl_scheduler(epochs):
    eta = 0.0035
    ours = [epoch_lr(e, epochs, eta) for e in range(epochs)]
    assert ours == pytest.approx(dassl_lrs(epochs, eta), rel=1e-9, abs=1e-12)
    assert min(ours[1:]) > 0  # the restarted cosine never reaches 0


def test_schedule_general_warmup():
    assert [epoch_lr(e, 10, 1.0, warmup_epochs=3, warmup_lr=0.1) for e in range(4)] == pytest.approx(
        [0.1, 0.1, 0.1, 1.0])
    assert epoch_lr(4, 10, 1.0, warmup_epochs=3) == pytest.approx(0.5 * (1 + math.cos(math.pi / 10)))


# --------------------------------------------------------------------------------------------------
# job grid


def test_expand_grid_defaults():
    b2n = load_protocol("base2new")
    jobs = expand_grid(b2n, ["coop", "zeroshot_clip"])
    assert len(jobs) == 11 * 3 * 2
    assert {(j.shots, j.seed) for j in jobs} == {(16, 1), (16, 2), (16, 3)}
    assert [j.dataset for j in jobs[:6]] == ["imagenet"] * 6  # jobs sharing data run together
    assert [j.method for j in jobs[:2]] == ["coop", "zeroshot_clip"]
    assert jobs[0].evals()[0].classes == "base" and jobs[0].train_classes == "base"

    xd = expand_grid(load_protocol("cross_dataset"), ["coop"])
    assert [(j.dataset, j.seed) for j in xd] == [("imagenet", 1), ("imagenet", 2), ("imagenet", 3)]
    assert [e.key for e in xd[0].evals()] == ["imagenet", *load_protocol("cross_dataset").spec["targets"]]

    fs = expand_grid(load_protocol("few_shot"), ["coop"])
    assert len(fs) == 11 * 5 * 3
    assert {j.shots for j in fs} == {1, 2, 4, 8, 16}


def test_expand_grid_selection():
    fs = load_protocol("few_shot")
    jobs = expand_grid(fs, ["coop"], ["dtd", "eurosat"], [2], [1, 16])
    assert [(j.dataset, j.shots, j.seed) for j in jobs] == [("dtd", 1, 2), ("dtd", 16, 2),
                                                            ("eurosat", 1, 2), ("eurosat", 16, 2)]
    assert len(expand_grid(fs, ["coop"], ["all"], None, None)) == 165
    assert len(expand_grid(fs, ["coop"], ["dtd", "dtd"], [1, 1], [2])) == 1  # duplicates collapse


@pytest.mark.parametrize("protocol,kwargs,bad", [
    ("base2new", {"datasets": ["no_such_set"]}, "no_such_set"),
    ("base2new", {"datasets": ["imagenet_a"]}, "imagenet_a"),          # a dataset, but not of this protocol
    ("cross_dataset", {"datasets": ["caltech101"]}, "caltech101"),     # a target is not a training set
    ("base2new", {"seeds": [4]}, "4"),
    ("base2new", {"shots": [8]}, "8"),
    ("few_shot", {"shots": [3]}, "3"),
])
def test_expand_grid_errors(protocol, kwargs, bad):
    p = load_protocol(protocol)
    with pytest.raises(BenchsuiteError) as info:
        expand_grid(p, ["coop"], kwargs.get("datasets"), kwargs.get("seeds"), kwargs.get("shots"))
    message = str(info.value)
    assert bad in message and protocol in message


# --------------------------------------------------------------------------------------------------
# the training loop applies the schedule once per epoch, with Dassl's SGD settings


def test_training_loop_uses_the_schedule(tiny_backbone, monkeypatch):
    import benchsuite.engine.train as train_module
    from benchsuite.engine.recipe import HARNESS_DEFAULTS
    from benchsuite.hookspecs import Method, hookimpl
    from benchsuite.methods import MethodEntry, job_manager

    seen: list[tuple[float, float, float]] = []

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):
            group = self.param_groups[0]
            seen.append((group["lr"], group["momentum"], group["weight_decay"]))
            return super().step(closure)

    class Scalar(Method):
        name = "scalar"
        image_input = "images"

        @hookimpl
        def recipe(self, protocol, dataset, shots):
            return {"epochs": 5}

        @hookimpl
        def setup(self, ctx):
            self.module = torch.nn.Linear(1, 1)
            return self.module

        @hookimpl
        def train_step(self, batch, epoch):
            return {"loss": (self.module(batch.images.mean().view(1, 1)) ** 2).sum()}

        @hookimpl
        def prepare_eval(self, classnames, dataset, template):
            pass

        @hookimpl
        def predict(self, batch):
            return batch.labels

    pm, method = job_manager(MethodEntry("scalar", Scalar, "tests", "0", "scalar"))
    module = method.setup(None)
    batches = [(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))] * 2  # two steps per epoch
    recipe = {**HARNESS_DEFAULTS, "epochs": 5, "lr": 0.002}
    expected = [lr for lr in dassl_lrs(5, 0.002) for _ in range(2)]  # before SGD is patched
    monkeypatch.setattr(train_module.torch.optim, "SGD", RecordingSGD)
    train_module.train(pm, "scalar", module, batches, recipe, tiny_backbone, "images")
    assert [lr for lr, _, _ in seen] == pytest.approx(expected, rel=1e-9)
    assert {(m, wd) for _, m, wd in seen} == {(0.9, 5e-4)}


def test_coop_few_shot_schedule_is_shared_by_the_coop_family():
    """CoOp, ProGrad and ProDA read one few-shot schedule (methods.md 4.2): 50/100/100/200/200, ImageNet 50."""
    from benchsuite.engine.recipe import coop_few_shot_epochs
    from benchsuite.methods import get_method, job_manager
    from benchsuite.protocols import load_protocol

    protocol = load_protocol("few_shot")
    assert [coop_few_shot_epochs("dtd", k) for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert {coop_few_shot_epochs("imagenet", k) for k in (1, 2, 4, 8, 16)} == {50}
    for name in ("coop", "prograd", "proda"):
        pm, _ = job_manager(get_method(name))
        for dataset in ("dtd", "imagenet"):
            for k in (1, 2, 4, 8, 16):
                assert pm.hook.recipe(protocol=protocol, dataset=dataset, shots=k)["epochs"] == \
                    coop_few_shot_epochs(dataset, k), (name, dataset, k)
