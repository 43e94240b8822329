"""PromptKD: Unsupervised prompt distillation for vision-language models (Li et al., CVPR'24), after
zhengli97/PromptKD ``trainers/promptkd.py`` (commit ec244f783c8b9b2503ad5a838a3fd97365686ddb), its
``clip/model.py`` (``IVLP`` design) and ``configs/trainers/PromptKD/*.yaml``, ``scripts/promptkd/*.sh``.

Two stages (the official README: "(a) pre-train a large CLIP teacher with labeled training images,
(b) reuse the teacher's text features for unsupervised prompt distillation"):

1. The teacher is a PromptSRC model (``benchsuite_plugins.promptsrc``) trained on the protocol's
   labelled few-shot data. Here it is a *job dependency*: ``ctx.trained_dependency("promptsrc")``
   trains the ``promptsrc`` job of the same protocol, dataset, shots, seed and backbone first when it
   is not stored (exactly as that job trains: its recipe, sample and seed), stores it in
   ``RESULTS/_trained/dependency-<job id>.pt`` and loads it from that file by its sha256; the
   result records the teacher's job id and hash in ``method.dependencies``.
2. The student distils on *unlabeled* images of the whole training split, all classes (the scripts'
   ``DATASET.NUM_SHOTS 0`` with every class: base2new's new classes included), declared as
   ``Method.train_data = "unlabeled_all"`` (labels are hidden by the harness: -1).

Behaviour followed
- Teacher text features of all classes are computed once ("pre-stored"): the frozen teacher's
  prompted text features (``CustomCLIP_teacher``: prompt learner + prompted text encoder, L2
  normalised) of ``ctx.all_classnames``, in the dataset's label order. The official teacher
  recomputes them every step from frozen tensors: the same values.
- Student (``CustomCLIP``): the run's image encoder with IVLP vision prompts only (4 tokens, depth 9;
  N(0, 0.02^2), input set appended after the positional embedding, deep sets replacing them before
  blocks 1..8), then the projector ``VPT_image_trans`` = Conv1x1(E_s -> E_t), BatchNorm, ReLU,
  Conv1x1(E_t -> E_t) on the [B, E_s] features (1x1 convolutions on a 1x1 map = linear layers, so
  ``nn.Linear`` + ``BatchNorm1d`` here, same parameters and statistics), then L2 normalisation.
  E_t is the teacher's embedding width (768 for the published ViT-L/14 teacher, the run's own here).
  The student learns no text prompt: the official student model holds only ``clip_model.visual``,
  the trainer's learnable set is every parameter named ``VPT`` (vision prompts + projector).
- Loss (``forward_backward``, fp32 branch): student logits s = exp(logit_scale) f_s . t_c, teacher
  logits = the frozen teacher's prompted logits on the same augmented batch, over all classes;
  L = KD_WEIGHT * T^2 * sum KL(softmax(teacher / T) || softmax(s / T)) / (B * C) with T = 1
  (``F.kl_div(log_softmax(s/T), softmax(t/T), reduction="sum") * T*T / s.numel()``); CE_WEIGHT 0 (no
  label is used). Returned parts: ``loss`` and ``kd`` (the unweighted KL term).
- Inference: exp(logit_scale) * student features . teacher text features of the evaluated classes
  (``test``: ``tea_text_features`` of the evaluated class set).

Default recipe per protocol (by task, so toy protocols inherit it)
- base2new: ``vit_b16_c2_ep20_batch8_4+4ctx`` + ``scripts/promptkd/base2new_train.sh``: 20 epochs,
  batch 8, lr 0.005, 1 warm-up epoch at 1e-5 (constant), cosine, SGD (Dassl defaults momentum 0.9,
  weight decay 5e-4), vision prompts 4 tokens at depth 9, T = 1, KD_WEIGHT 1000; 200 for
  fgvc_aircraft, oxford_flowers and dtd (the script's comment: its command line passes 1000 for all,
  the comment names 200 for those three: the comment's per-dataset values are taken, UNCONFIRMED).
- transfer (cross_dataset, domain_generalization): ``..._cross_datasets``: depth 3, otherwise as
  base2new (KD_WEIGHT 1000, ``xd_train.sh``); the teacher is the ``promptsrc`` transfer job.
- few_shot: no PromptKD few-shot config exists; the base2new recipe is used (UNCONFIRMED), the
  teacher being the ``promptsrc`` few-shot job, the student distilled on the unlabeled train split.
- ``teacher``: ``"promptsrc"`` (the method whose trained job is the teacher).

Deliberate deviations
- Teacher backbone: the published teacher is PromptSRC on ViT-L/14 (``TEACHER_NAME: "ViT-L/14"``,
  ``configs/trainers/PromptSRC/vit_l14_c2_ep20_batch8_4+4ctx.yaml``: batch 8, depth 9, 20 epochs);
  the harness has one backbone per run, so the teacher is the run's backbone (ViT-B/16 in the real
  protocols) with PromptSRC's own default recipe for the protocol. The projector then maps 512 -> 512.
- Teacher training data: the published base2new teachers are PromptSRC trained on 16 shots of the
  base classes (``model-best.pth.tar``); the published cross-dataset teacher is PromptSRC on
  ImageNet (``ImageNet-xd/.../model.pth.tar-20``). Here: the protocol's own ``promptsrc`` job.
- Cross-dataset / DG: the published student is distilled on each *target* dataset's unlabeled train
  split with the ImageNet teacher (``xd_train.sh`` per target, README Table 2 "transductive"). A
  benchsuite transfer job trains once on its source and evaluates every target, so the student is
  distilled on the source's (ImageNet's) unlabeled train split and evaluated on the targets with the
  teacher's text features of their classes. Per-target distillation is not implemented.
- Model selection: the configs' ``TEST.FINAL_MODEL: "best_val"`` (best epoch on the validation
  split) is not used; the protocols evaluate the last epoch.
- Precision: fp32 master prompts and projector. The official ``PREC: "fp16"`` runs the student's
  image encoder and the projector's convolutions in fp16 (``convert_weights(self.VPT_image_trans)``,
  also under fp32, where its fp32 path fails on an fp16 weight: the parity script casts the
  projector to fp32); the teacher runs in the run's precision too.
- No sample dropped by the loader (harness-wide rule; Dassl drops the last partial batch).
- As IVLP: a configured depth beyond the tower's blocks means every block.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchsuite.clip.layer_prompts import LayerPrompts, clamp_depth
from benchsuite.errors import BenchsuiteError
from benchsuite.hookspecs import EvalBatch, Method, SetupContext, TrainBatch, hookimpl

#: Datasets distilled with KD_WEIGHT 200 (``scripts/promptkd/base2new_train.sh``'s comment); others 1000.
KD_WEIGHT_200 = ("fgvc_aircraft", "oxford_flowers", "dtd")


class Projector(nn.Module):
    """``Feature_Trans_Module_two_layer``: 1x1 conv (= linear), BatchNorm, ReLU, 1x1 conv."""

    def __init__(self, input_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(input_dim, out_dim), nn.BatchNorm1d(out_dim), nn.ReLU(inplace=True),
                                 nn.Linear(out_dim, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class StudentPrompts(nn.Module):
    """The student's learnables: deep vision prompts of the run's image encoder and the projector."""

    def __init__(self, backbone, *, n_ctx_vision: int, depth_vision: int, teacher_dim: int):
        super().__init__()
        if n_ctx_vision < 1 or depth_vision < 1:
            raise BenchsuiteError(f"promptkd: the student needs n_ctx_vision >= 1 and prompt_depth_vision >= 1 "
                                  f"(got {n_ctx_vision}, {depth_vision})")
        self.backbone = [backbone]  # a list keeps the frozen model out of this module's state
        self.vision = LayerPrompts(clamp_depth(depth_vision, backbone.vision_layers), n_ctx_vision,
                                   backbone.vision_width)
        self.projector = Projector(backbone.embed_dim, teacher_dim)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Projected, L2-normalised student features [B, E_t] (fp32)."""
        features = self.backbone[0].encode_image(images, prompts=self.vision.input, deep_prompts=self.vision.deep())
        return F.normalize(self.projector(features).float(), dim=-1)


class PromptKD(Method):
    name = "promptkd"
    summary = "Unsupervised prompt distillation from a PromptSRC teacher on unlabeled images (CVPR'24)"
    image_input = "images"
    min_batch_size = 2  # the projector's BatchNorm
    setting = "teacher-distilled"
    transductive = True  # unlabeled images of every class, new ones included ("transductive ZSL")
    train_data = "unlabeled_all"
    extra_knowledge = ("PromptSRC teacher (published: ViT-L/14)", "unlabeled images of all classes")

    def __init__(self) -> None:
        self.backbone = None
        self.student: StudentPrompts | None = None
        self.teacher = None  # the teacher's method instance (PromptSRC), frozen
        self.teacher_text: torch.Tensor | None = None  # pre-stored teacher text features, all classes
        self.text_features: torch.Tensor | None = None  # teacher text features of the evaluated classes
        self.kd_weight, self.temperature = 1000.0, 1.0

    @hookimpl
    def recipe(self, protocol, dataset: str, shots: int) -> dict[str, Any]:
        transfer = protocol.task == "transfer"
        kd_weight = 200.0 if dataset in KD_WEIGHT_200 and not transfer else 1000.0
        return {"epochs": 20, "batch_size": 8, "lr": 0.005, "n_ctx_vision": 4,
                "prompt_depth_vision": 3 if transfer else 9, "temperature": 1.0, "kd_weight": kd_weight,
                "teacher": "promptsrc"}

    # ---- model ----------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_text_features(self, classnames: list[str]) -> torch.Tensor:
        """The frozen teacher's normalised prompted text features of `classnames` [C, E_t] (fp32)."""
        self.teacher.learner.set_classnames(classnames)
        with self.backbone.autocast():
            return self.teacher.class_text_features().detach()

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        image = self.teacher.prompted_image_features(images)
        return self.teacher.logits(image, self.teacher_text)

    @hookimpl
    def setup(self, ctx: SetupContext) -> nn.Module:
        r = ctx.recipe
        if not float(r["temperature"]) > 0:
            raise BenchsuiteError(f"promptkd: temperature must be > 0, got {r['temperature']}")
        self.backbone = ctx.backbone
        self.kd_weight, self.temperature = float(r["kd_weight"]), float(r["temperature"])
        dependency = ctx.trained_dependency(str(r["teacher"]))
        self.teacher = dependency.method
        if getattr(self.teacher, "learner", None) is None or not hasattr(self.teacher, "prompted_image_features"):
            raise BenchsuiteError(f"promptkd: teacher {r['teacher']!r} is not an IVLP-family prompt learner "
                                  f"(promptsrc, ivlp)")
        classnames = ctx.all_classnames if ctx.all_classnames is not None else ctx.classnames
        self.teacher_text = self.teacher_text_features(list(classnames))
        self.student = StudentPrompts(ctx.backbone, n_ctx_vision=int(r["n_ctx_vision"]),
                                      depth_vision=int(r["prompt_depth_vision"]),
                                      teacher_dim=int(self.teacher_text.shape[1]))
        return self.student

    def logits(self, student_features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        with self.backbone.fp32():
            return self.backbone.logit_scale * student_features.float() @ text.float().t()

    @hookimpl
    def train_step(self, batch: TrainBatch, epoch: int) -> dict[str, torch.Tensor]:
        teacher = self.teacher_logits(batch.images)
        student = self.logits(self.student.image_features(batch.images), self.teacher_text)
        with self.backbone.fp32():
            t = self.temperature
            kd = F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher.float() / t, dim=1),
                          reduction="sum") * (t * t) / student.numel()
            return {"loss": self.kd_weight * kd, "kd": kd}

    @hookimpl
    def prepare_eval(self, classnames: list[str], dataset: str, template: str) -> None:
        self.text_features = self.teacher_text_features(classnames)

    @hookimpl
    def predict(self, batch: EvalBatch) -> torch.Tensor:
        return self.logits(self.student.image_features(batch.images), self.text_features)


@hookimpl
def benchsuite_methods():
    return [PromptKD]
