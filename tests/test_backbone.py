"""Backbone loading: a local state dict, an OpenAI-style TorchScript archive, random weights, errors."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch

from benchsuite.clip.backbone import load_backbone, weights_sha256
from benchsuite.errors import BackboneError

from conftest import TINY_MODEL


class _Box(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _torchscript_archive(state: dict[str, torch.Tensor]) -> torch.jit.ScriptModule:
    """A TorchScript module whose state dict has exactly these keys, like OpenAI's release files."""
    root = _Box()
    for key, value in state.items():
        *path, leaf = key.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, _Box())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(value.clone(), requires_grad=False))
    return torch.jit.script(root)


def test_openai_jit_archive_loads_to_the_same_weights(tmp_path):
    """OpenAI's loader reads the architecture from the archive's shapes (64-wide heads, QuickGELU),
    so the model here is OpenAI-shaped; its weights are fp16, as in the release files."""
    open_clip.add_model_config(Path(__file__).parent / "model_configs" / "bs-tiny-jit.json")
    torch.manual_seed(5)
    state = {k: v.half().float() for k, v in open_clip.create_model("bs-tiny-jit").state_dict().items()}
    torch.save(state, tmp_path / "twin.pt")
    reference = load_backbone("bs-tiny-jit", str(tmp_path / "twin.pt"))
    path = tmp_path / "ViT-tiny.pt"
    _torchscript_archive({k: v.half() for k, v in state.items() if k != "attn_mask"}).save(str(path))
    loaded = load_backbone("bs-tiny-jit", str(path))
    assert loaded.pretrained == "ViT-tiny.pt"
    assert loaded.weights_sha256 == reference.weights_sha256
    tokens = loaded.tokenize(["a photo of a dog."])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.model.encode_text(tokens), reference.model.encode_text(tokens), atol=1e-6)
        assert torch.allclose(loaded.encode_image(images), reference.encode_image(images), atol=1e-6)


def test_state_dict_checkpoint_and_random_weights(tiny_checkpoint):
    first = load_backbone(TINY_MODEL, str(tiny_checkpoint))
    assert first.pretrained == tiny_checkpoint.name and first.image_spec.size == 32
    assert first.weights_sha256 == weights_sha256(first.model)
    random_a, random_b = load_backbone(TINY_MODEL, "none"), load_backbone(TINY_MODEL, "none")
    assert random_a.weights_sha256 == random_b.weights_sha256 != first.weights_sha256  # fixed random init
    assert all(not p.requires_grad for p in first.model.parameters()) and not first.model.training


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                              ("amp", torch.float32), ("fp32", torch.float32)])
def test_precisions_cast_frozen_weights_and_keep_the_hash(tiny_checkpoint, precision, dtype):
    backbone = load_backbone(TINY_MODEL, str(tiny_checkpoint), precision=precision)
    assert backbone.model.token_embedding.weight.dtype == dtype
    assert backbone.weights_sha256 == load_backbone(TINY_MODEL, str(tiny_checkpoint)).weights_sha256


@pytest.mark.parametrize("model, pretrained, message", [
    ("no-such-model", "none", "unknown open_clip model 'no-such-model'"),
    (TINY_MODEL, "/nowhere/weights.pt", "does not exist"),
    (TINY_MODEL, "laion2b", "has no pretrained tag 'laion2b'"),
])
def test_bad_backbones_are_refused_with_the_reason(model, pretrained, message):
    with pytest.raises(BackboneError, match=message):
        load_backbone(model, pretrained)


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, path)
    with pytest.raises(BackboneError, match="does not fit model"):
        load_backbone(TINY_MODEL, str(path))
