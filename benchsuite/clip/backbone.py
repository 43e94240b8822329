"""Load an open_clip backbone (pretrained tag, local checkpoint or random weights), frozen.

Precision modes (recorded in every result):
- fp32: fp32 weights, fp32 compute.
- fp16 / bf16: frozen weights cast to that dtype; a method's learnable tensors stay fp32 masters
  and are cast on use, so gradients reach fp32 parameters (the originals ran plain fp16 SGD).
- amp: fp32 weights and parameters, compute under `torch.autocast` (fp16 on CUDA, bf16 on CPU).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data.transforms import CLIP_MEAN, CLIP_STD, ImageSpec
from ..errors import BackboneError
from .encoders import encode_image_prompted, encode_text_embeddings

PRECISIONS = ("fp32", "fp16", "bf16", "amp")
_WEIGHT_DTYPES = {"fp32": torch.float32, "amp": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSpec:
    """A model a plugin ships (hook ``benchsuite_models``): an open_clip config file registered under
    ``name``, and checkpoint files addressable by their short name through ``--pretrained``."""

    name: str
    config: Path
    checkpoints: dict[str, Path] = field(default_factory=dict)


def _plugin_models() -> list[ModelSpec]:
    from ..methods import contributions  # lazy: plugin discovery imports the entry points

    return [spec for _, spec in contributions("benchsuite_models")]


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' means CUDA when available, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError(f"--device {name} was requested but torch sees no CUDA device; use --device cpu")
    return device


def default_precision(device: torch.device) -> str:
    return "amp" if device.type == "cuda" else "fp32"


def weights_sha256(model: nn.Module) -> str:
    """Hash of every tensor of the state dict (name, dtype, shape, bytes), independent of file format."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


_TORCHSCRIPT_MARKS = ("constants.pkl", "code/")


def _weights_only_kwargs() -> dict[str, bool]:
    """`weights_only=True` for open_clip versions that accept it; older ones call torch.load without
    it, which torch>=2.6 (the pinned minimum) already treats as weights_only=True."""
    import inspect

    import open_clip

    return {"weights_only": True} if "weights_only" in inspect.signature(open_clip.create_model).parameters else {}


def _is_torchscript(path: Path) -> bool:
    """True only for a well-formed TorchScript archive (OpenAI's original release files).

    `torch.jit.save` writes one top-level folder holding `data.pkl`, `constants.pkl`, `version`
    and compiled code under `code/__torch__/`; `torch.save` writes `data.pkl` without the other
    two. A zip carrying some TorchScript marks but not this layout is malformed and refused: it
    must never fall through to a pickle loader (a `torch.save` file with an added `code/` entry
    was once taken for TorchScript and unpickled without `weights_only`).
    """
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise BackboneError(f"checkpoint {path} is a damaged zip archive ({exc}); download it again") from exc
    tops = {name.split("/", 1)[0] for name in names}
    rest = {name.split("/", 1)[1] for name in names if "/" in name}
    marked = any(mark in part for part in rest for mark in _TORCHSCRIPT_MARKS)
    strict = (len(tops) == 1 and all("/" in n for n in names) and {"data.pkl", "constants.pkl", "version"} <= rest
              and any(part.startswith("code/__torch__/") for part in rest))
    if marked and not strict:
        raise BackboneError(f"checkpoint {path} is a malformed archive: it carries TorchScript entries "
                            f"(code/, constants.pkl) without the TorchScript layout; refusing to load it. "
                            f"Pass an original TorchScript release file or a plain state dict saved with torch.save")
    return strict


def _load_torchscript(path: Path) -> nn.Module:
    """Build an open_clip model from a TorchScript archive's weights, as OpenAI's loader does, but
    without its fallback to unpickling the file when the archive does not load."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip.model import build_model_from_openai_state_dict

    try:
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception as exc:  # torch raises RuntimeError and friends for archives it cannot read
        raise BackboneError(f"checkpoint {path} looks like a TorchScript archive but torch.jit.load refused it "
                            f"({type(exc).__name__}); the file is malformed, download it again") from exc
    try:
        model = build_model_from_openai_state_dict(state, cast_dtype=None).float()
    except (KeyError, RuntimeError, ValueError, IndexError) as exc:
        raise BackboneError(f"TorchScript archive {path} does not hold a CLIP model's weights ({exc})") from exc
    model.visual.image_mean = OPENAI_DATASET_MEAN
    model.visual.image_std = OPENAI_DATASET_STD
    return model


def _create(model_name: str, pretrained: str, cache_dir: str | None) -> tuple[nn.Module, str]:
    """Return the fp32 CPU model and the label recorded as its pretrained source."""
    import open_clip

    known = open_clip.list_models()
    path = Path(pretrained).expanduser()
    if pretrained.lower() == "none":
        if model_name not in known:
            raise BackboneError(f"unknown open_clip model {model_name!r}; see `python -c \"import open_clip; print(open_clip.list_models())\"`")
        torch.manual_seed(0)  # random weights, but the same ones on every run
        return open_clip.create_model(model_name, pretrained=None), "none"
    if path.is_file():
        if _is_torchscript(path):  # the architecture comes from the archive's shapes, as in OpenAI's loader
            return _load_torchscript(path), path.name
        if model_name not in known:
            raise BackboneError(f"unknown open_clip model {model_name!r} for checkpoint {path}")
        try:  # every file that is not TorchScript is read as weights only: a pickle never runs code
            return open_clip.create_model(model_name, pretrained=str(path), **_weights_only_kwargs()), path.name
        except pickle.UnpicklingError as exc:
            raise BackboneError(f"checkpoint {path} holds more than tensors (refused by torch.load(weights_only="
                                f"True): {str(exc).splitlines()[0]}); save a plain state dict instead") from exc
        except Exception as exc:  # open_clip raises RuntimeError/KeyError on mismatched state dicts
            raise BackboneError(f"checkpoint {path} does not fit model {model_name!r}: {exc}") from exc
    if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise BackboneError(f"checkpoint file {path} does not exist; pass an existing file or an open_clip tag")
    if model_name not in known:
        raise BackboneError(f"unknown open_clip model {model_name!r}; open_clip knows e.g. ViT-B-16, ViT-B-32, RN50")
    tags = [t for m, t in open_clip.list_pretrained() if m == model_name]
    if pretrained not in tags:
        raise BackboneError(f"{model_name!r} has no pretrained tag {pretrained!r}; known tags: {', '.join(tags) or 'none'}; "
                            f"or pass a local checkpoint file, or 'none' for random weights")
    try:
        return open_clip.create_model(model_name, pretrained=pretrained, cache_dir=cache_dir,
                                      **_weights_only_kwargs()), pretrained
    except Exception as exc:
        raise BackboneError(
            f"could not obtain weights {model_name}/{pretrained}: {exc}. Without network, download the "
            f"checkpoint elsewhere and pass its path: --pretrained /path/to/checkpoint"
        ) from exc


@dataclass
class Backbone:
    """A frozen open_clip CLIP plus the helpers methods need; shared by all jobs of a run."""

    model: nn.Module
    model_name: str
    pretrained: str
    weights_sha256: str
    precision: str
    device: torch.device
    tokenizer: object
    image_spec: ImageSpec
    truncate_text: bool = True
    #: how `load_backbone` was called (model name, pretrained tag or path, cache dir): `reload`
    load_args: tuple[str, str, str | None] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return _WEIGHT_DTYPES[self.precision]

    def private_copy(self) -> "Backbone":
        """The same backbone with its own deep copy of the model (frozen, same device and dtype):
        what a method that trains backbone parts changes instead of the shared model."""
        import copy
        import dataclasses

        return dataclasses.replace(self, model=copy.deepcopy(self.model))

    def reload(self) -> None:
        """Replace the model by a fresh load of the same weights (a job changed the shared one).

        Checked against the recorded weights hash: weights that do not load back identically
        (a checkpoint file changed on disk since) are a BackboneError, not a silent swap."""
        if self.load_args is None:
            raise BackboneError("the backbone cannot be reloaded: it was not built by load_backbone")
        name, pretrained, cache_dir = self.load_args
        fresh = load_backbone(name, pretrained, precision=self.precision, device=self.device, cache_dir=cache_dir)
        if fresh.weights_sha256 != self.weights_sha256:
            raise BackboneError(f"reloading backbone {name}/{pretrained} gave other weights (sha256 "
                                f"{fresh.weights_sha256[:12]}, the run started with {self.weights_sha256[:12]}); "
                                f"the checkpoint changed on disk during the run: start the run again")
        self.model = fresh.model

    @property
    def logit_scale(self) -> torch.Tensor:
        """exp(logit_scale), frozen, used as is (about 100 for OpenAI weights)."""
        return self.model.logit_scale.detach().exp().float()

    @property
    def text_width(self) -> int:
        return self.model.token_embedding.weight.shape[1]

    @property
    def embed_dim(self) -> int:
        """Width of the joint image-text space (text and image features)."""
        proj = self.model.text_projection
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    # ---- shape facts: what prompt shapes and depths fit this model ---------------------------
    @property
    def text_layers(self) -> int:
        return len(self.model.transformer.resblocks)

    @property
    def text_context_length(self) -> int:
        return int(self.model.positional_embedding.shape[0])

    def _vit(self) -> nn.Module:
        visual = self.model.visual
        if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
            raise BackboneError(f"{self.model_name}: the image tower is not a ViT ({type(visual).__name__}); "
                                f"vision prompts need an open_clip VisionTransformer")
        return visual

    @property
    def vision_layers(self) -> int:
        return len(self._vit().transformer.resblocks)

    @property
    def vision_width(self) -> int:
        return int(self._vit().conv1.out_channels)

    @property
    def image_size(self) -> int:
        return self.image_spec.size

    @property
    def patch_count(self) -> int:
        """Patch tokens of one image, without the class token (196 for ViT-B/16 at 224)."""
        grid = self._vit().grid_size
        return int(grid[0] * grid[1])

    def autocast(self):
        """The compute context for every forward of this run (a no-op except for amp)."""
        if self.precision != "amp":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def fp32(self):
        """Leave autocast for a small fp32 computation (logits, losses) inside a step."""
        return torch.autocast(device_type=self.device.type, enabled=False)

    def cosine_logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """exp(logit_scale) * cos(image, text) in fp32, the CoOp family's classifier: image features
        are normalised here, text features must be normalised already. fp32 because cosine logits
        near 100 lose ties in bf16/fp16."""
        with self.fp32():
            image = torch.nn.functional.normalize(image_features.float(), dim=-1)
            return self.logit_scale * image @ text_features.float().t()

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids on the host ([N, context_length]); EOT is the argmax (highest id)."""
        return self.tokenizer(texts)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Frozen word embeddings of token ids, on the device."""
        with torch.no_grad():
            return self.model.token_embedding(tokens.to(self.device))

    def encode_embeddings(self, embeddings: torch.Tensor, eot: torch.Tensor, *, deep_prompts=None,
                          eot_device: torch.Tensor | None = None, block_hook=None, rep_tokens=None) -> torch.Tensor:
        """Prompted text encoder (differentiable w.r.t. `embeddings` and `deep_prompts`); see
        `encoders.encode_text_embeddings` for `eot` (host), `eot_device`, `block_hook` and `rep_tokens`."""
        return encode_text_embeddings(self.model, embeddings.to(self.dtype), eot, deep_prompts=deep_prompts,
                                      truncate=self.truncate_text, eot_device=eot_device, block_hook=block_hook,
                                      rep_tokens=rep_tokens)

    @torch.no_grad()
    def template_classifier(self, classnames: list[str], template: str) -> torch.Tensor:
        """Zero-shot CLIP's classifier: the L2-normalised fp32 frozen text features of ``template``
        filled with each class name (cleaned, ``_`` -> space), [C, D]; what zero-shot CLIP and the
        adapter family score against."""
        from ..data.registry import format_template

        texts = [format_template(template, name) for name in classnames]
        return torch.nn.functional.normalize(self.encode_text(texts).float(), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Frozen features of plain texts (zero-shot classifiers, teachers), not normalised."""
        tokens = self.tokenize(texts)
        return self.encode_embeddings(self.embed_tokens(tokens), tokens.argmax(dim=-1))

    def encode_image(self, images: torch.Tensor, **prompting) -> torch.Tensor:
        """Image features; keyword arguments go to `encode_image_prompted` (prompts, deep_prompts...)."""
        images = images.to(self.device, dtype=self.dtype, non_blocking=True)
        return encode_image_prompted(self.model.visual, images, **prompting)


def load_backbone(model_name: str, pretrained: str, *, precision: str = "fp32", device: torch.device | str = "cpu",
                  cache_dir: str | None = None) -> Backbone:
    """Build, freeze and place the backbone; hash its weights before any precision cast."""
    import open_clip

    if precision not in PRECISIONS:
        raise BackboneError(f"precision {precision!r} is not one of {PRECISIONS}")
    for spec in _plugin_models():  # plugin models (the toy world's small CLIP) are open_clip names like any other
        if spec.name not in open_clip.list_models():
            open_clip.add_model_config(spec.config)
        if spec.name == model_name and pretrained in spec.checkpoints and not Path(pretrained).expanduser().exists():
            pretrained = str(spec.checkpoints[pretrained])  # shipped with the plugin, loaded as a local file
    device = torch.device(device)
    model, source = _create(model_name, pretrained, cache_dir)
    if not hasattr(model, "token_embedding"):
        raise BackboneError(f"{model_name} has a custom (e.g. Hugging Face) text tower; prompt learning needs "
                            f"open_clip's built-in text transformer")
    if getattr(model, "text_pool_type", "argmax") != "argmax" or getattr(model, "attn_mask", None) is None:
        raise BackboneError(f"{model_name}: prompt learning here needs a causal text transformer pooled at the EOT "
                            f"token (argmax), as in OpenAI CLIP; this model uses text_pool_type="
                            f"{getattr(model, 'text_pool_type', None)!r}")
    tokenizer = open_clip.get_tokenizer(model_name)
    if not hasattr(tokenizer, "encode"):
        raise BackboneError(f"{model_name}: its tokenizer ({type(tokenizer).__name__}) is not CLIP's BPE tokenizer, "
                            f"which prompt layouts are built on")
    model = model.float()
    digest = weights_sha256(model)
    model.eval().requires_grad_(False)
    model = model.to(device=device, dtype=_WEIGHT_DTYPES[precision])
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    mean = tuple(getattr(model.visual, "image_mean", None) or CLIP_MEAN)
    std = tuple(getattr(model.visual, "image_std", None) or CLIP_STD)
    return Backbone(model=model, model_name=model_name, pretrained=source, weights_sha256=digest,
                    precision=precision, device=device, tokenizer=tokenizer,
                    image_spec=ImageSpec(size=size, mean=mean, std=std),
                    load_args=(model_name, pretrained, cache_dir))
