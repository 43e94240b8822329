"""The whole plugin contract of benchsuite, readable in one file.

Two levels, as in pytest:

1. **Discovery.** A distribution declares an entry point in the group ``benchsuite`` that names a
   module (or object). benchsuite registers it in a discovery ``PluginManager`` and calls
   :func:`benchsuite_methods`; each plugin returns the :class:`Method` classes it contributes.
   Built-in methods (``benchsuite_plugins.*``) are registered through the very same group.

2. **One job.** For every job the harness instantiates the method class and registers that one
   instance, next to the harness's own default implementations (``trylast``), in a fresh
   ``PluginManager``. The harness owns the loop, seeding, data, timing and evaluation; the hooks
   below are the only places a method supplies behaviour. Hook argument names are checked when the
   instance is registered: an implementation asking for an argument the spec does not offer, or
   a hook name the contract does not declare, is refused with an error naming plugin and hook.

A job runs, in this order::

    recipe(protocol, dataset, shots)           -> default hyper-parameters (epochs, lr, ...)
    setup(ctx)                                 -> nn.Module holding everything learnable
    train_views(image_spec)                    -> extra view transforms (default none)
    for each epoch:                            (harness: SGD, warm-up, epoch-stepped cosine)
        for each batch:
            train_step(batch, epoch)           -> {"loss": tensor, ...}
            backward(outputs, model)           (harness default: outputs["loss"].backward())
        epoch_end(epoch, num_epochs)
    train_end()
    for each evaluation set:
        prepare_eval(classnames, dataset, template)
        predict(batch)                         -> logits [B, n_classes]

Capabilities that are not behaviour are class attributes of :class:`Method`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import pluggy
import torch
from torch import nn

if TYPE_CHECKING:
    from .clip.backbone import Backbone, ModelSpec
    from .data.registry import DatasetSpec
    from .data.transforms import ImageSpec
    from .protocols import Protocol

PROJECT = "benchsuite"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Method:
    """Base class of a method plugin. Subclass it, set the attributes, implement hooks.

    Attributes
    ----------
    name:
        Registry name used on the command line and in results (lower-case, no spaces).
    summary:
        One line for ``benchsuite list methods``.
    frozen_image_encoder:
        True when the method's image features are those of the frozen, unprompted image encoder
        (zero-shot, CoOp, CoCoOp, KgCoOp, ProGrad, ProDA). The harness then computes image
        features itself and passes them as ``batch.image_features`` (and may cache them across
        methods and seeds). False for methods that prompt or tune the image encoder (IVLP, MaPLe,
        PromptSRC, GOPro): they receive ``batch.images`` and call ``ctx.backbone.encode_image``.
    """

    name: str = ""
    summary: str = ""
    frozen_image_encoder: bool = True


@dataclass
class SetupContext:
    """Everything a method may use to build itself for one job."""

    backbone: "Backbone"          #: frozen open_clip model + tokenizer + prompted encoders
    classnames: list[str]         #: training class names, index = label (raw; clean with `_`->space)
    dataset: str                  #: training dataset name
    template: str                 #: the dataset's hand-crafted template, e.g. "a photo of a {}."
    recipe: dict[str, Any]        #: resolved recipe (default from `recipe`, plus user overrides)
    protocol: "Protocol"
    shots: int
    seed: int
    device: torch.device


@dataclass
class TrainBatch:
    """One training batch, already on the device.

    ``images`` are augmented with the protocol's train transform. ``image_features`` is set by the
    harness (no grad) when the method declares ``frozen_image_encoder``; it is the raw, not yet
    normalised output of the frozen encoder. ``views`` holds extra augmented views of the same
    images when the method asked for them through :func:`train_views` (GOPro).
    """

    images: torch.Tensor
    labels: torch.Tensor
    image_features: Optional[torch.Tensor] = None
    views: list[torch.Tensor] = field(default_factory=list)


@dataclass
class EvalBatch:
    """One evaluation batch. Exactly one of ``images`` / ``image_features`` is set, following
    ``Method.frozen_image_encoder``; features may come from the harness's feature cache."""

    labels: torch.Tensor
    images: Optional[torch.Tensor] = None
    image_features: Optional[torch.Tensor] = None


class DiscoverySpec:
    """Hooks of the discovery plugin manager (modules named by entry points). Every hook is optional:
    a plugin implements the ones for what it contributes. The toy world (``benchsuite.toy.plugin``)
    uses the last three, through the same entry-point group a third party uses."""

    @hookspec
    def benchsuite_methods(self) -> list[type[Method]]:
        """Return the :class:`Method` subclasses this plugin contributes."""

    @hookspec
    def benchsuite_datasets(self) -> list["DatasetSpec"]:
        """Return datasets (``benchsuite.data.registry.DatasetSpec``) to register next to the built-in
        ones. A spec with ``default_root`` needs no ``--data-root``: it returns (creating it on first
        use) the folder that holds the dataset, as the toy world does. A name registered twice with
        different specs is an error naming both."""

    @hookspec
    def benchsuite_models(self) -> list["ModelSpec"]:
        """Return open_clip model configs and named checkpoints shipped with the plugin
        (``benchsuite.clip.backbone.ModelSpec``); ``--backbone NAME --pretrained CHECKPOINT_NAME`` then
        loads them like any local checkpoint file."""

    @hookspec
    def benchsuite_commands(self, subparsers: Any) -> None:
        """Add subcommands to the ``benchsuite`` command line (``subparsers`` is argparse's; set
        ``func`` with ``set_defaults`` to a callable taking the parsed namespace and returning the exit code)."""


class MethodSpec:
    """Hooks of one job. ``firstresult`` hooks take the method's answer before the harness default."""

    @hookspec(firstresult=True)
    def recipe(self, protocol: "Protocol", dataset: str, shots: int) -> dict[str, Any]:
        """Default recipe of this method for one job of a protocol (the paper's config for it).

        Keys the harness reads (others are the method's own and are recorded too):
        ``epochs`` (0 = no training), ``batch_size``, ``lr``, ``momentum`` (0.9),
        ``weight_decay`` (5e-4), ``warmup_epochs`` (1), ``warmup_lr`` (1e-5),
        ``model_selection`` ("last_epoch"; anything else is refused unless the user explicitly
        allows it, and such results are marked as off-protocol). The whole dict is hashed into
        the result's ``config_hash``.
        """

    @hookspec(firstresult=True)
    def setup(self, ctx: SetupContext) -> nn.Module:
        """Build the method for the training classes and return the module holding its state.

        The harness optimises the module's parameters with ``requires_grad``, toggles its
        ``train()``/``eval()`` (the frozen backbone stays in eval mode unless the method puts it
        inside this module), and saves its ``state_dict()`` to share a training between protocols
        (cross_dataset and domain_generalization). Register class-dependent tensors (prompt
        prefix/suffix embeddings) as non-persistent buffers: they are rebuilt by
        :func:`prepare_eval` for every evaluation class set and must not be saved.
        Frozen teachers (zero-shot text features, a frozen image encoder) are built here too.
        """

    @hookspec(firstresult=True)
    def train_views(self, image_spec: "ImageSpec") -> list[Callable]:
        """Extra views of every training image (default none), e.g. GOPro's MoCo-v3 and AugMix views.

        Return one transform per view, each mapping the decoded PIL RGB image to a tensor of the
        backbone's input size (``image_spec`` gives size, mean and std); the harness applies them in
        the loader, next to the protocol's train transform, and passes the results, batched, in
        ``TrainBatch.views`` in the same order.
        """

    @hookspec(firstresult=True)
    def train_step(self, batch: TrainBatch, epoch: int) -> dict[str, torch.Tensor]:
        """Forward one batch; return a dict with the total ``"loss"`` and any named parts.

        Runs under the harness's autocast context. Do not call ``.item()`` here: values are
        gathered lazily by the harness so a CUDA step never waits on the host.
        """

    @hookspec(firstresult=True)
    def backward(self, outputs: dict[str, torch.Tensor], model: nn.Module) -> bool:
        """Turn the step's outputs into ``.grad`` of the parameters, before the optimizer step.

        The harness default calls ``outputs["loss"].backward()``. A method that edits gradients
        (ProGrad projects the task gradient against the teacher's) implements this hook, fills
        ``.grad`` itself, and returns True. Gradients are zeroed by the harness before each step.
        """

    @hookspec
    def epoch_end(self, epoch: int, num_epochs: int) -> None:
        """Called after every training epoch (e.g. PromptSRC's Gaussian prompt aggregation)."""

    @hookspec
    def train_end(self) -> None:
        """Called once after the last epoch, before evaluation (e.g. load aggregated weights)."""

    @hookspec(firstresult=True)
    def prepare_eval(self, classnames: list[str], dataset: str, template: str) -> None:
        """Rebuild the classifier for an evaluation class set (base, new, another dataset).

        Methods whose text side does not depend on the image compute their class text features
        once here, not once per test batch. Called under ``torch.no_grad()`` and autocast.
        """

    @hookspec(firstresult=True)
    def predict(self, batch: EvalBatch) -> torch.Tensor:
        """Logits [B, n_classes] for the class set of the last :func:`prepare_eval`."""


class HarnessDefaults:
    """The harness's own implementations, registered ``trylast`` so a method's answer wins."""

    @hookimpl(trylast=True)
    def train_views(self, image_spec: "ImageSpec") -> list[Callable]:
        return []

    @hookimpl(trylast=True)
    def backward(self, outputs: dict[str, torch.Tensor], model: nn.Module) -> bool:
        outputs["loss"].backward()
        return True

    @hookimpl(trylast=True)
    def setup(self, ctx: SetupContext) -> nn.Module:
        return nn.Module()


#: Hooks a method must implement itself (everything else has a harness default or is optional).
REQUIRED_HOOKS = ("recipe", "prepare_eval", "predict")
#: Hooks required when the resolved recipe trains (epochs > 0).
TRAINING_HOOKS = ("train_step",)
