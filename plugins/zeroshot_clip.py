"""Zero-shot CLIP (CoOp repository, `trainers/zsclip.py`, class `ZeroshotCLIP`; methods.md 4.1).

Behaviour followed: one hand-crafted template per dataset (CoOp's CUSTOM_TEMPLATES, methods.md 3.1),
class names with `_` replaced by a space, text and image features L2-normalised, logits =
exp(logit_scale) * cosine. No ensembling (the ZeroshotCLIP2 variant is not the reported baseline).
Base-to-new: the classifier is built from the evaluated subset's class names only (the repo's
script omits SUBSAMPLE_CLASSES; the published numbers evaluate base and new separately).

Recipe per protocol: nothing is learned (epochs = 0) in every protocol.
Deliberate deviations: none beyond the harness-wide ones (the backbone runs in the precision the
run asks for, fp32 on CPU, where the original ran fp16 on GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchsuite.hookspecs import EvalBatch, Method, SetupContext, hookimpl


class ZeroshotCLIP(Method):
    name = "zeroshot_clip"
    summary = "Zero-shot CLIP with the dataset's hand-crafted template (CoOp's ZeroshotCLIP)"
    image_input = "features"

    def __init__(self) -> None:
        self.backbone = None
        self.text_features: torch.Tensor | None = None

    @hookimpl
    def recipe(self, protocol, dataset: str, shots: int) -> dict:
        return {"epochs": 0, "template": "coop_custom"}

    @hookimpl
    def setup(self, ctx: SetupContext) -> torch.nn.Module:
        self.backbone = ctx.backbone
        return torch.nn.Module()

    @hookimpl
    def prepare_eval(self, classnames: list[str], dataset: str, template: str) -> None:
        self.text_features = self.backbone.template_classifier(classnames, template)

    @hookimpl
    def predict(self, batch: EvalBatch) -> torch.Tensor:
        with self.backbone.fp32():  # cosine logits near 100 lose ties in bf16/fp16
            image = F.normalize(batch.image_features.float(), dim=-1)
            return self.backbone.logit_scale * image @ self.text_features.t()


@hookimpl
def benchsuite_methods():
    return [ZeroshotCLIP]
