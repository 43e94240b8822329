"""Nothing silently wrong: a job that changes the shared frozen backbone is refused (and the backbone
reloaded, the feature cache never fed from it); non-finite logits fail the job; results are strict JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import benchsuite.methods as methods_module
from benchsuite.clip.integrity import backbone_print, changes
from benchsuite.hookspecs import hookimpl
from benchsuite.methods import MethodEntry, discover
from benchsuite.results.store import ResultStore, dump_json, read_json
from benchsuite.results.validate import validate_files, validate_result
from benchsuite_plugins.zeroshot_clip import ZeroshotCLIP
from test_run import load_results, result_files, run_quiet




def _args(tmp_path, tiny_checkpoint, data_root, name: str, methods: str, cache: str | None = None) -> list[str]:
    return ["run", "--protocol", "base2new", "--method", *methods.split(","), "--dataset", "eurosat", "--seeds", "1",
            "--backbone", "bs-tiny-test", "--pretrained", str(tiny_checkpoint), "--data-root", str(data_root),
            "--results", str(tmp_path / name), "--feature-cache", str(tmp_path / (cache or f"{name}-features")),
            "--quiet"]


# ---- the print --------------------------------------------------------------------------------

def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.BatchNorm1d(4)).eval().requires_grad_(False)
    return model


def test_an_untouched_model_prints_the_same():
    model = _model()
    assert changes(backbone_print(model), backbone_print(model)) == []


@pytest.mark.parametrize("tamper,expected", [
    (lambda m: m[0].weight.data.__setitem__((0, 0), m[0].weight.data[0, 0] + 1e-6), "0.weight: values changed"),
    (lambda m: m[0].weight.data.copy_(m[0].weight.data.flip(0)), "0.weight: values changed"),  # values only moved
    (lambda m: m[1].weight.requires_grad_(True), "1.weight has requires_grad=True"),
    (lambda m: m[2].running_mean.add_(1.0), "2.running_mean: values changed"),  # a buffer
    (lambda m: m.__setitem__(0, nn.Linear(4, 4)), "0.weight"),  # a replaced module
    (lambda m: setattr(m[0], "weight", nn.Parameter(m[0].weight.detach().clone(), requires_grad=False)),
     "0.weight was replaced"),
    (lambda m: m[2].train(), "module 2 is in training mode"),
    (lambda m: m[1].register_forward_hook(lambda *a: None), "module 1 has 1 forward hook(s)"),
    (lambda m: m[0].to(torch.float16), "0.weight is torch.float16"),
])
def test_every_kind_of_change_is_named(tamper, expected):
    model = _model()
    before = backbone_print(model)
    tamper(model)
    found = changes(before, backbone_print(model))
    assert any(expected in line for line in found), found


# ---- a job that changes the backbone ------------------------------------------------------------

class Tamper(ZeroshotCLIP):
    """Zero-shot, but it overwrites the backbone's visual projection (a careless plugin author)."""

    name = "tamper"

    @hookimpl
    def setup(self, ctx):
        generator = torch.Generator().manual_seed(1)
        proj = ctx.backbone.model.visual.proj
        proj.data.copy_(torch.randn(proj.shape, generator=generator).to(proj))
        return super().setup(ctx)


def test_a_job_that_changes_the_backbone_is_refused_and_later_jobs_and_the_cache_stay_clean(
        with_methods, tmp_path, tiny_checkpoint, data_root):
    with_methods(Tamper)
    code, out, err = run_quiet(_args(tmp_path, tiny_checkpoint, data_root, "clean", "zeroshot_clip"))
    assert code == 0, out + err
    (clean,) = load_results(tmp_path / "clean").values()

    code, out, err = run_quiet(_args(tmp_path, tiny_checkpoint, data_root, "mixed", "tamper,zeroshot_clip"))
    assert code == 1, out + err
    assert "method 'tamper' changed the frozen backbone" in out + err and "visual.proj: values changed" in out + err
    results = load_results(tmp_path / "mixed")
    assert [key[0] for key in results] == ["zeroshot_clip"]  # tamper's result refused
    assert results[("zeroshot_clip", "eurosat", 16, 1)]["metrics"] == clean["metrics"]  # scored on pristine weights

    # a later, clean process reading the feature cache the tampered run filled scores as the clean run
    code, out, err = run_quiet(_args(tmp_path, tiny_checkpoint, data_root, "later", "zeroshot_clip",
                                     cache="mixed-features"))
    assert code == 0, out + err
    (later,) = load_results(tmp_path / "later").values()
    assert later["metrics"] == clean["metrics"]


def test_the_backbone_is_reloaded_identically_and_a_changed_file_is_refused(tiny_backbone, tmp_path):
    import copy

    backbone = copy.copy(tiny_backbone)
    backbone.model = copy.deepcopy(tiny_backbone.model)
    before = backbone_print(backbone.model)
    backbone.model.visual.proj.data.zero_()
    backbone.reload()
    after = backbone_print(backbone.model)
    assert [line for line in changes(before, after, limit=10**6) if "was replaced by another tensor" not in line] == []
    backbone.weights_sha256 = "0" * 64  # as if the checkpoint file changed since the run began
    from benchsuite.errors import BackboneError
    with pytest.raises(BackboneError, match="gave other weights"):
        backbone.reload()


# ---- non-finite logits and strict JSON ----------------------------------------------------------

class NaNLogits(ZeroshotCLIP):
    name = "nan_logits"

    @hookimpl
    def predict(self, batch):
        logits = super().predict(batch)
        return logits * torch.where(batch.labels == 0, math.nan, 1.0)[:, None]


def test_non_finite_logits_fail_the_job_naming_method_and_evaluation_set(with_methods, tmp_path, tiny_checkpoint,
                                                                         data_root):
    with_methods(NaNLogits)
    code, out, err = run_quiet(_args(tmp_path, tiny_checkpoint, data_root, "r", "nan_logits"))
    assert code == 1, out + err
    text = out + err
    assert "method 'nan_logits'" in text and "non-finite logits" in text and "evaluation set 'base'" in text
    assert load_results(tmp_path / "r") == {}
    assert list((tmp_path / "r" / "_logs").rglob("*.log"))


def test_results_are_strict_json_and_non_finite_values_are_refused(tmp_path, tiny_checkpoint, data_root):
    code, out, err = run_quiet(_args(tmp_path, tiny_checkpoint, data_root, "r", "zeroshot_clip"))
    assert code == 0, out + err
    (path,) = result_files(tmp_path / "r")
    result = json.loads(path.read_text())
    assert validate_result(result) == []

    result["metrics"]["base"]["accuracy"] = math.nan
    assert any("$.metrics.base.accuracy: nan is not a finite number" in p for p in validate_result(result))
    with pytest.raises(ValueError):
        dump_json(result)
    from benchsuite.errors import ResultError
    with pytest.raises(ResultError, match="not a finite number"):
        ResultStore(tmp_path / "other").write(result)

    path.write_text(json.dumps(result))  # Python's json writes NaN unless told not to
    data, why = read_json(path)
    assert data is None and "NaN" in why and "not JSON" in why
    assert any("NaN" in p for p in validate_files([path])[path])


# ---- plugin versions ----------------------------------------------------------------------------

def test_the_plugin_version_is_recorded_and_a_new_version_runs_its_jobs_again(monkeypatch, tmp_path, tiny_checkpoint,
                                                                              data_root):
    def installed(version: str) -> None:
        found = {**discover(), "zeroshot_clip": MethodEntry("zeroshot_clip", ZeroshotCLIP, "zs-dist", version,
                                                            "zeroshot_clip")}
        monkeypatch.setattr(methods_module, "discover", lambda: found)

    args = _args(tmp_path, tiny_checkpoint, data_root, "r", "zeroshot_clip")
    installed("1.0")
    assert run_quiet(args)[0] == 0
    (first,) = result_files(tmp_path / "r")
    result = json.loads(first.read_text())
    assert (result["method"]["source"], result["method"]["version"]) == ("zs-dist", "1.0")
    code, out, err = run_quiet(args)
    assert code == 0 and "result exists, reused" in out and result_files(tmp_path / "r") == [first]

    installed("1.1")  # an upgrade: the old result is not this code's
    code, out, err = run_quiet(args)
    assert code == 0 and "result exists, reused" not in out, out + err
    files = result_files(tmp_path / "r")
    assert len(files) == 2
    versions = sorted(json.loads(p.read_text())["method"]["version"] for p in files)
    assert versions == ["1.0", "1.1"]
    # the leaderboard keeps the installed version's result of the cell and says why it refused the other
    board = tmp_path / "board.md"
    code, out, err = run_quiet(["leaderboard", "--results", str(tmp_path / "r"), "--out", str(board), "--no-plots"])
    text = board.read_text()
    old = next(p for p in files if json.loads(p.read_text())["method"]["version"] == "1.0")
    refused = text[text.index("Refused"):]
    assert old.name in refused or str(old) in refused or old.stem in refused, text
    assert "installed plugin version wins" in refused
