"""CoPrompt: Consistency-guided Prompt learning (Roy & Etemad, ICLR'24; arXiv 2306.01195), after
ShuvenduRoy/CoPrompt at commit a2a6c12e3622cfe4b3a127f4ba0c4f3eb841418c: ``trainers/coprompt.py``,
``clip/model.py`` (MaPLe's, unchanged but for the trainer name), ``configs/trainers/coprompt.yaml``,
``scripts/base2new_{train,test}_coprompt.sh`` and the GPT description files ``gpt_file/*_prompt.json``.

Behaviour followed
- Prompts: exactly MaPLe (``benchsuite_plugins.maple``; the official ``MultiModalPromptLearner`` is
  MaPLe's): n_ctx 2 from "a photo of a" (the frozen words "of a" stay in the prompt), deep text
  prompts up to ``prompt_depth`` 9, vision prompts as Linear projections of the text prompts.
- Adapters (``CustomCLIP``): two residual adapters, one on the prompted image feature and one on the
  prompted text feature, each ``ReLU(W2 ReLU(W1 f))`` with bias-free W1: E -> E/4, W2: E/4 -> E
  (CLIP-Adapter's ``Adapter``, imported from ``benchsuite_plugins.clip_adapter``), mixed as
  ``r * A(f) + (1 - r) * f`` on the raw (unnormalised) feature with r = 0.1 for the image and 0.2 for
  the text (hard-coded ``image_adapter_m`` / ``text_adapter_m``; recipe keys ``image_adapter_ratio``,
  ``text_adapter_ratio``). Logits = exp(logit_scale) * cos(adapted image, adapted text), the same
  forward at training and test time.
- Loss: CE(logits, y) + W * (L_text + L_image), W = ``TRAINER.W`` = 1.0 (``consistency_weight``),
  ``TRAINER.DISTILL`` "cosine" (``distill``): L = 1 - mean_rows cos(student, target) with
  ``nn.CosineSimilarity(dim=1, eps=1e-7)``. ``distill=mse`` is the official other branch
  (``F.mse_loss`` on the same normalised features). Parts returned: ``ce``, ``consistency_text``,
  ``consistency_image``.
- Text target: the frozen CLIP's normalised features of the LLM descriptions of every training class
  (``gpt_clip_classifier``: a tensor [n_descriptions, C, E], so every class must have the same number
  of descriptions, which the official ``torch.stack`` requires too). Every training step draws ONE
  index j uniformly (the official ``random.randint(0, n - 1)`` per forward) and the target of class c
  is description j of class c (the same j for every class of that step, not one draw per class),
  re-normalised.
- Image target: the frozen, unprompted image encoder (the official separate ``clip_model_distill``,
  here the same frozen backbone, never a second copy) applied to a second, independently augmented
  view of every training image (``DATALOADER.K_TRANSFORMS: 2``: Dassl applies the train transform twice;
  here ``train_views`` returns the protocol's train transform once more, so both views are
  independent draws of the same transform), normalised, no gradient. The student side of L_image is
  the adapted, normalised prompted feature of the first view.
- Parameters on ViT-B/16 at depth 9: MaPLe's 3,555,072 + 2 adapters x 131,072 = 3,817,216.

LLM class descriptions (external assets: ``setting = "external-text"``)
- Recipe keys ``descriptions`` (a JSON file ``{"class name": ["description", ...]}``, keys the class
  names with ``_`` replaced by a space, as the official lookup ``gpt_prompts[classname.replace("_",
  " ")]``) and ``descriptions_sha256`` (the file's expected sha256, verified at setup; a mismatch is a
  one-line error naming the file's actual sha256 and the ``--set`` that records it). The recipe, with
  both keys, is recorded in every result and hashed into its config hash.
- Default for a real dataset: the official file name under ``gpt_file/``, relative to the working
  directory like the official trainer's ``open(f"gpt_file/{name}_prompt.json")``, and its official
  sha256. The files are NOT shipped with benchsuite (fetched data, never committed): get them from
  https://github.com/ShuvenduRoy/CoPrompt/tree/a2a6c12e3622cfe4b3a127f4ba0c4f3eb841418c/gpt_file and
  run from the folder that holds ``gpt_file/``, or pass ``--set coprompt.descriptions=<path>``.
  sha256 of the official files at that commit (classes x descriptions each):
  caltech101 ``caltech_prompt.json`` (100 x 50) e98b2b4809f04d9055296696518a78584d4252235d523e3093e9c52b3dba7564;
  dtd ``dtd_prompt.json`` (47 x 50) 5dd358b0bd09c98d6d4d6ed4d5048f5c1d4dddc24cf3a8c69d45bb4d68287991;
  eurosat ``eurosat_prompt.json`` (10 x 10) a6aaa8850fd902ed74bfab940e5aac2f1b3ebfdecf7b3c6fb2201c91c9339e06;
  fgvc_aircraft ``fgvc_prompt.json`` (100 x 50) a29ddbf5c1cab48b6fbcbb9e4930df55e69f83d20d0fc508969d7c75a2457fa2;
  food101 ``food101_prompt.json`` (101 x 50) a9564b8e8e371b06416f7ae9e5508853431fb3eae6a4212843802bd07e1a8c0d;
  oxford_flowers ``oxford_flowers_prompt.json`` (102 x 10) 0202f638ed18a2633375f84175b3db70bfc14927c6c82d57a87d42a1e722f844;
  oxford_pets ``oxford_pets_prompt.json`` (37 x 10) 14a697c4e72e0115189b501a4be64ef033bf94fcb540819632cb34afe9d29ff2;
  stanford_cars ``stanford_cars_prompt.json`` (196 x 50) 3505d5d67a06b76af14e3e74d6543da3d59aa4b29869a30cbbb56adbc751fe8e;
  sun397 ``sun397_prompt.json`` (397 x 50) f743422d1786b66b019c4f7d80b181a00be0b6a783a36c5fb928aa45d59662d4;
  ucf101 ``ucf101_prompt.json`` (101 x 50) 39bc7fbf0e7e60d48cc9e50ed008e6a5d7003c2d68713f0f76ec823cbdce0d09.
  ImageNet (``imagenet_prompt.json``, also the cross-dataset and domain-generalization source) and its
  variants: the repository lists the files, but the mirrored snapshot did not hold their content, so
  no sha256 could be read: the default expects none, and a run refuses until
  ``--set coprompt.descriptions_sha256=<the sha256 the error prints>`` records the file used.
- Toy datasets: ``descriptions = "builtin:toy"``, a small hand-written file shipped with the toy world
  (``benchsuite/toy/coprompt_descriptions.json``, 4 descriptions for each of the 49 toy classes), whose
  sha256 the recipe records.
- A missing file, a training class the file does not describe, unequal description counts or a
  description longer than the text encoder's context are one-line errors naming the option and the fix.
  Only the training classes need descriptions (evaluation uses the prompts and adapters alone).
- The description index comes from a ``torch.Generator`` seeded with the job seed (the official code
  uses the global Python ``random`` stream); its state goes into the epoch checkpoint
  (``training_state``), so a resumed job draws what the uninterrupted one draws.

Default recipe (every protocol: the repository has one config, ``coprompt.yaml``)
- batch 4, lr 0.0035, 8 epochs, SGD momentum 0.9, weight decay 5e-4, 1 constant warm-up epoch at 1e-5,
  cosine, n_ctx 2 from "a photo of a", prompt depth 9, W 1.0, cosine distillation, last epoch (the
  README's test commands load epoch 8 for every dataset except Food101, which loads epoch 5 although
  the config trains 8 epochs and Dassl saves only the last epoch: UNCONFIRMED how Food101 was trained;
  8 epochs are used everywhere).
- base2new: the scripts above (16 shots, base classes). cross_dataset / domain_generalization (one
  ImageNet training) and few_shot: the repository has no scripts or configs for them (the open issue
  ShuvenduRoy/CoPrompt#4 asks whether cross-dataset uses the base-to-new setup): the same config is
  used, UNCONFIRMED. ShuvenduRoy/CoPrompt#6 quotes a config "modified based on the paper"
  with lr 0.035, depth 12 and W 8.0; the paper text could not be read here, so the released config's
  values are taken (UNCONFIRMED which the paper's numbers used).

Deliberate deviations
- Train augmentation. The official config trains on ``TRANSFORMS: ["randaugment", "normalize"]``
  (Dassl: Resize to 224 x 224, RandAugment n=2 m=10, no crop, no flip) for both views. benchsuite's
  protocols fix one train transform for every method (random resized crop + flip, recorded in each
  result), so both views here are independent draws of the protocol's transform.
- fp32 master parameters. The official ``PREC: "fp16"`` builds the adapters in fp16
  (``Adapter(512, 4).to(clip_model.dtype)``) and trains them, and the MaPLe prompts, with plain SGD in
  fp16, with MaPLe's ``.half()`` casts of the prompts (see ``benchsuite_plugins.maple``). Here all
  parameters are fp32, the adapters, logits and losses run in fp32 (``backbone.fp32()``), and the
  prompts are cast to the dtype of the hidden states they join.
- The description targets are encoded by the run's backbone in its precision and kept in fp32 (the
  official: the fp16 ``clip_model_distill``); the image target comes from the shared frozen backbone.
- The adapter width is the backbone's embedding width (the official code hard-codes 512, ViT-B/16's).
- No sample dropped by the loader (harness-wide rule; Dassl drops the last partial batch).
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchsuite.clip.prompts import EVAL_CHUNK
from benchsuite.data.registry import clean_classname
from benchsuite.data.transforms import train_transform
from benchsuite.errors import BenchsuiteError
from benchsuite.hookspecs import EvalBatch, SetupContext, TrainBatch, hookimpl
from benchsuite_plugins.clip_adapter import Adapter, mix
from benchsuite_plugins.maple import MaPLe, MultiModalPrompts

OFFICIAL_COMMIT = "a2a6c12e3622cfe4b3a127f4ba0c4f3eb841418c"
#: benchsuite dataset -> (official gpt_file name, its sha256 at OFFICIAL_COMMIT; "" where it was not readable)
OFFICIAL_DESCRIPTIONS: dict[str, tuple[str, str]] = {
    "caltech101": ("caltech_prompt.json", "e98b2b4809f04d9055296696518a78584d4252235d523e3093e9c52b3dba7564"),
    "dtd": ("dtd_prompt.json", "5dd358b0bd09c98d6d4d6ed4d5048f5c1d4dddc24cf3a8c69d45bb4d68287991"),
    "eurosat": ("eurosat_prompt.json", "a6aaa8850fd902ed74bfab940e5aac2f1b3ebfdecf7b3c6fb2201c91c9339e06"),
    "fgvc_aircraft": ("fgvc_prompt.json", "a29ddbf5c1cab48b6fbcbb9e4930df55e69f83d20d0fc508969d7c75a2457fa2"),
    "food101": ("food101_prompt.json", "a9564b8e8e371b06416f7ae9e5508853431fb3eae6a4212843802bd07e1a8c0d"),
    "oxford_flowers": ("oxford_flowers_prompt.json",
                       "0202f638ed18a2633375f84175b3db70bfc14927c6c82d57a87d42a1e722f844"),
    "oxford_pets": ("oxford_pets_prompt.json", "14a697c4e72e0115189b501a4be64ef033bf94fcb540819632cb34afe9d29ff2"),
    "stanford_cars": ("stanford_cars_prompt.json",
                      "3505d5d67a06b76af14e3e74d6543da3d59aa4b29869a30cbbb56adbc751fe8e"),
    "sun397": ("sun397_prompt.json", "f743422d1786b66b019c4f7d80b181a00be0b6a783a36c5fb928aa45d59662d4"),
    "ucf101": ("ucf101_prompt.json", "39bc7fbf0e7e60d48cc9e50ed008e6a5d7003c2d68713f0f76ec823cbdce0d09"),
    "imagenet": ("imagenet_prompt.json", ""),
    "imagenetv2": ("imagenetv2_prompt.json", ""),
    "imagenet_sketch": ("imagenet_sketch_prompt.json", ""),
    "imagenet_a": ("imagenet_a_prompt.json", ""),
    "imagenet_r": ("imagenet_r_prompt.json", ""),
}
#: The recipe value naming the description file shipped with the toy world.
TOY_DESCRIPTIONS = "builtin:toy"
TOY_DESCRIPTIONS_FILE = "coprompt_descriptions.json"
DISTILL = ("cosine", "mse")
COSINE_EPS = 1e-7  # the official nn.CosineSimilarity(dim=1, eps=1e-07)
FIX = "--set coprompt.descriptions=<path to a JSON file {\"class name\": [\"description\", ...]}>"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def toy_descriptions_path() -> Path:
    return Path(str(resources.files("benchsuite.toy") / TOY_DESCRIPTIONS_FILE))


def _is_toy(dataset: str) -> bool:
    try:
        from benchsuite.toy.datasets import toy_dataset_names
    except ImportError:  # pragma: no cover - the toy world ships with benchsuite
        return False
    return dataset in toy_dataset_names()


def default_descriptions(dataset: str) -> tuple[str, str]:
    """(descriptions, descriptions_sha256) of the default recipe for a training dataset."""
    if _is_toy(dataset):
        return TOY_DESCRIPTIONS, file_sha256(toy_descriptions_path())
    if dataset in OFFICIAL_DESCRIPTIONS:
        name, sha = OFFICIAL_DESCRIPTIONS[dataset]
        return f"gpt_file/{name}", sha
    return "", ""


def resolve_descriptions(value: str, dataset: str) -> Path:
    """The description file a recipe value names (one-line error when there is none)."""
    if not value:
        raise BenchsuiteError(f"coprompt: no LLM class-description file for dataset {dataset!r} (recipe key "
                              f"'descriptions' is empty); CoPrompt needs one: {FIX}")
    path = toy_descriptions_path() if value == TOY_DESCRIPTIONS else Path(value).expanduser()
    if not path.is_file():
        where = f" (relative to the working directory {Path.cwd()})" if not path.is_absolute() else ""
        hint = ("; the official files are in gpt_file/ of github.com/ShuvenduRoy/CoPrompt at commit "
                f"{OFFICIAL_COMMIT[:7]}: run from the folder holding gpt_file/ or pass {FIX}")
        raise BenchsuiteError(f"coprompt: description file {value}{where} not found{hint}")
    return path


def load_descriptions(path: Path, expected_sha256: str, classnames: list[str], *, label: str,
                      backbone=None) -> list[list[str]]:
    """Per training class its descriptions (official order), after checking the file's sha256, that every
    class is described, that all have the same count and (given the backbone) that each fits its context."""
    actual = file_sha256(path)
    if actual != expected_sha256:
        expected = expected_sha256 or "none recorded"
        raise BenchsuiteError(f"coprompt: description file {label} has sha256 {actual}, the recipe expects "
                              f"{expected}; pass the file with the expected sha256, or record this one with "
                              f"--set coprompt.descriptions_sha256={actual}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BenchsuiteError(f"coprompt: description file {label} is not readable JSON ({exc}); {FIX}") from None
    if not isinstance(data, dict):
        raise BenchsuiteError(f"coprompt: description file {label} must hold one JSON object "
                              f"{{\"class name\": [descriptions]}}; {FIX}")
    names = [clean_classname(c) for c in classnames]
    missing = [n for n in names if n not in data]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise BenchsuiteError(f"coprompt: description file {label} does not describe the training class(es) "
                              f"{shown} (keys are class names with '_' as a space); add them or {FIX}")
    out = []
    for n in names:
        texts = data[n]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise BenchsuiteError(f"coprompt: description file {label}: class {n!r} needs a non-empty list of "
                                  f"non-empty strings; {FIX}")
        out.append(texts)
    counts = {len(t) for t in out}
    if len(counts) > 1:
        by = ", ".join(f"{n!r}: {len(t)}" for n, t in list(zip(names, out))[:6])
        raise BenchsuiteError(f"coprompt: description file {label} gives the training classes different numbers of "
                              f"descriptions ({by}, ...); CoPrompt draws one description index for all classes "
                              f"per step (the official torch.stack needs equal counts): give every class the same "
                              f"number, or {FIX}")
    if backbone is not None:
        limit = backbone.text_context_length
        for n, texts in zip(names, out):
            for t in texts:
                if len(backbone.tokenizer.encode(t)) + 2 > limit:
                    raise BenchsuiteError(f"coprompt: description file {label}: a description of {n!r} is longer "
                                          f"than the text encoder's {limit} tokens ({t[:60]!r}...); the official "
                                          f"tokenizer refuses it too: shorten it, or {FIX}")
    return out


@torch.no_grad()
def description_features(backbone, texts: list[list[str]]) -> torch.Tensor:
    """Normalised frozen text features [n_descriptions, C, E] (fp32), the official ``clip_weights``; at most
    `EVAL_CHUNK` texts per text-encoder call."""
    flat = [t for class_texts in texts for t in class_texts]
    parts = [backbone.encode_text(flat[i:i + EVAL_CHUNK]).float() for i in range(0, len(flat), EVAL_CHUNK)]
    features = F.normalize(torch.cat(parts), dim=-1)
    return features.view(len(texts), len(texts[0]), -1).transpose(0, 1).contiguous()


class CoPromptModule(nn.Module):
    """MaPLe's prompts (drawn first, in the official order) and the image and text adapters."""

    def __init__(self, backbone, n_ctx: int, ctx_init: str, depth: int, reduction: int):
        super().__init__()
        self.prompts = MultiModalPrompts(backbone, n_ctx, ctx_init, depth)
        self.adapter_image = Adapter(backbone.embed_dim, reduction)
        self.adapter_text = Adapter(backbone.embed_dim, reduction)


class CoPrompt(MaPLe):
    name = "coprompt"
    summary = "CoPrompt: MaPLe prompts + feature adapters, consistency to frozen CLIP on LLM descriptions and a 2nd view (ICLR'24)"
    image_input = "images"
    setting = "external-text"
    extra_knowledge = ("LLM class descriptions",)

    def __init__(self) -> None:
        super().__init__()
        self.module: CoPromptModule | None = None
        self.ratios = (0.1, 0.2)
        self.weight, self.distill = 1.0, "cosine"
        self.descriptions: torch.Tensor | None = None  # [n_descriptions, C, E], training classes
        self.generator: torch.Generator | None = None

    @hookimpl
    def recipe(self, protocol, dataset: str, shots: int) -> dict[str, Any]:
        descriptions, sha = default_descriptions(dataset)
        return {"epochs": 8, "batch_size": 4, "lr": 0.0035, "n_ctx": 2, "ctx_init": "a photo of a", "prompt_depth": 9,
                "image_adapter_ratio": 0.1, "text_adapter_ratio": 0.2, "adapter_reduction": 4,
                "consistency_weight": 1.0, "distill": "cosine", "descriptions": descriptions,
                "descriptions_sha256": sha}

    @hookimpl
    def setup(self, ctx: SetupContext) -> nn.Module:
        r = ctx.recipe
        self.ratios = (float(r["image_adapter_ratio"]), float(r["text_adapter_ratio"]))
        for key, value in zip(("image_adapter_ratio", "text_adapter_ratio"), self.ratios):
            if not 0.0 <= value <= 1.0:
                raise BenchsuiteError(f"coprompt: {key}={value} must lie in [0, 1] (--set coprompt.{key}=...)")
        self.weight, self.distill = float(r["consistency_weight"]), str(r["distill"])
        if self.distill not in DISTILL:
            raise BenchsuiteError(f"coprompt: distill={self.distill!r} is not one of {DISTILL} "
                                  f"(--set coprompt.distill=cosine)")
        value = str(r["descriptions"])
        path = resolve_descriptions(value, ctx.dataset)
        texts = load_descriptions(path, str(r["descriptions_sha256"]), ctx.classnames, label=value,
                                  backbone=ctx.backbone)
        self.backbone = ctx.backbone
        # parameters drawn in the official order: MaPLe's prompt learner, then the image and text adapters
        self.module = CoPromptModule(ctx.backbone, int(r["n_ctx"]), str(r["ctx_init"]), int(r["prompt_depth"]),
                                     int(r["adapter_reduction"]))
        self.learner = self.module.prompts
        self.learner.prompts.set_classnames(ctx.classnames)
        # training classes only; kept out of the state dict (not a buffer), rebuilt by every setup
        self.descriptions = description_features(ctx.backbone, texts).to(ctx.device)
        self.generator = torch.Generator().manual_seed(int(ctx.seed))
        return self.module.to(ctx.device)

    @hookimpl
    def train_views(self, image_spec) -> list[Callable]:
        return [train_transform(image_spec)]  # K_TRANSFORMS 2: a second draw of the train transform

    def next_description(self) -> int:
        """The description index of this step (the official random.randint(0, n - 1)), seeded."""
        return int(torch.randint(self.descriptions.shape[0], (1,), generator=self.generator))

    def adapted_text(self) -> torch.Tensor:
        text = self.learner.text_features()
        with self.backbone.fp32():
            return F.normalize(mix(self.module.adapter_text, text.float(), self.ratios[1]), dim=-1)

    def adapted_image(self, images: torch.Tensor) -> torch.Tensor:
        image = self.learner.image_features(self.backbone, images)
        with self.backbone.fp32():
            return F.normalize(mix(self.module.adapter_image, image.float(), self.ratios[0]), dim=-1)

    def consistency(self, student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.distill == "cosine":
            return 1.0 - F.cosine_similarity(student, target, dim=1, eps=COSINE_EPS).mean()
        return F.mse_loss(student, target)

    def frozen_view_features(self, batch: TrainBatch) -> torch.Tensor:
        if not batch.views:
            raise BenchsuiteError("coprompt: train_step needs the second augmented view (TrainBatch.views[0], "
                                  "from train_views); the harness supplies it")
        with torch.no_grad():
            features = self.backbone.encode_image(batch.views[0])
        return F.normalize(features.float(), dim=-1)

    @hookimpl
    def train_step(self, batch: TrainBatch, epoch: int) -> dict[str, torch.Tensor]:
        text = self.adapted_text()
        image = self.adapted_image(batch.images)
        frozen_image = self.frozen_view_features(batch)
        index = self.next_description()
        with self.backbone.fp32():
            target_text = F.normalize(self.descriptions[index], dim=-1)
            logits = self.backbone.logit_scale * image @ text.t()
            ce = F.cross_entropy(logits, batch.labels)
            c_text = self.consistency(text, target_text)
            c_image = self.consistency(image, frozen_image)
            loss = ce + self.weight * (c_text + c_image)
        return {"loss": loss, "ce": ce, "consistency_text": c_text, "consistency_image": c_image}

    @hookimpl
    def training_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    @hookimpl
    def load_training_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    @hookimpl
    def prepare_eval(self, classnames: list[str], dataset: str, template: str) -> None:
        self.learner.prompts.set_classnames(classnames)
        self.text_features = self.adapted_text()

    @hookimpl
    def predict(self, batch: EvalBatch) -> torch.Tensor:
        image = self.adapted_image(batch.images)
        with self.backbone.fp32():
            return self.backbone.logit_scale * image @ self.text_features.t()


@hookimpl
def benchsuite_methods():
    return [CoPrompt]
