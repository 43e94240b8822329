"""An out-of-tree benchsuite method, written only against the public plugin contract.

`oot_linear` keeps CLIP frozen and learns a class-agnostic linear residual on the zero-shot text
features (W starts at zero, so the untrained method is zero-shot CLIP) plus a temperature offset.
Being class-agnostic it transfers to new classes and other datasets. Its recipe trains for a few
epochs, so the harness loop (optimizer, schedule, train_step) is exercised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchsuite.data.registry import format_template
from benchsuite.hookspecs import EvalBatch, Method, SetupContext, TrainBatch, hookimpl


class TextResidual(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim, dim))
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(text + text @ self.weight.t(), dim=-1)


class OotLinear(Method):
    name = "oot_linear"
    summary = "Out-of-tree example: linear residual on zero-shot text features + temperature"
    image_input = "features"

    def __init__(self) -> None:
        self.backbone = None
        self.module: TextResidual | None = None
        self.train_text: torch.Tensor | None = None
        self.eval_text: torch.Tensor | None = None

    @hookimpl
    def recipe(self, protocol, dataset, shots):
        return {"epochs": 3, "batch_size": 16, "lr": 0.01}

    def _zero_shot(self, classnames, template):
        texts = [format_template(template, name) for name in classnames]
        return F.normalize(self.backbone.encode_text(texts).float(), dim=-1)

    def _logits(self, image_features, text):
        with self.backbone.fp32():  # the contract: logits and losses in fp32, also under amp
            scale = self.backbone.logit_scale * self.module.log_temperature.exp()
            return scale * F.normalize(image_features.float(), dim=-1) @ self.module(text).t()

    @hookimpl
    def setup(self, ctx: SetupContext) -> nn.Module:
        self.backbone = ctx.backbone
        self.module = TextResidual(ctx.backbone.embed_dim)
        self.train_text = self._zero_shot(ctx.classnames, ctx.template).to(ctx.device)
        return self.module

    @hookimpl
    def train_step(self, batch: TrainBatch, epoch):
        logits = self._logits(batch.image_features, self.train_text)
        return {"loss": F.cross_entropy(logits, batch.labels)}

    @hookimpl
    def prepare_eval(self, classnames, dataset, template):
        self.eval_text = self._zero_shot(classnames, template)

    @hookimpl
    def predict(self, batch: EvalBatch) -> torch.Tensor:
        return self._logits(batch.image_features, self.eval_text)


@hookimpl
def benchsuite_methods():
    return [OotLinear]
