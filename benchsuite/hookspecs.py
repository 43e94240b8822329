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
                                                  (harness: + drop_last, image_input; a toy profile
                                                  scales epochs, warmup_epochs, Method.epoch_settings)
    smoke check (only before a training):       a fresh instance runs setup, one train_step +
                                                  backward, prepare_eval and predict on a few images;
                                                  RNG restored, nothing of it reaches the real job
    setup(ctx)                                 -> nn.Module holding everything learnable (moved to
                                                  the device by the harness); ctx.trained_dependency(m)
                                                  trains or loads another method's job first (PromptKD)
    train_views(image_spec)                    -> extra view transforms (default none)
    load_training_state(state)                 (only when the job resumes from an epoch checkpoint:
                                                  after module, optimizer and RNGs are restored)
    for each epoch:                            (harness: SGD, warm-up, epoch-stepped cosine)
        for each batch:                        (never smaller than Method.min_batch_size)
            train_step(batch, epoch)           -> {"loss": fp32 scalar tensor, "part": ..., ...}
            backward(outputs, model, scaler)   (harness default: loss.backward(), scaled when a
                                                  GradScaler is active; then the harness unscales,
                                                  skips non-finite steps, steps and updates)
        every part's epoch mean recorded and checked for finiteness (one host sync per epoch)
        epoch_end(epoch, num_epochs)
        training_state()                       -> non-module state, kept in the epoch checkpoint
    train_end()
    for each evaluation set:
        prepare_eval(classnames, dataset, template)
        predict(batch)                         -> fp32 logits [B, n_classes]

Capabilities that are not behaviour are class attributes of :class:`Method`.

What a method may use of the backbone (``ctx.backbone``, a :class:`benchsuite.clip.backbone.Backbone`;
anything else of it is internal and may change):

- ``encode_text(texts)``: frozen features of plain strings, not normalised, no grad.
- ``encode_image(images, **prompting)``: image features (prompted when given visual prompts,
  see ``benchsuite.clip.encoders.encode_image_prompted``), not normalised, differentiable.
- ``encode_embeddings(embeddings, eot, deep_prompts=..., eot_device=...)``: the text encoder on
  token embeddings (learnable context spliced in), pooled at the EOT position ``eot`` (host).
- ``tokenize(texts)`` (host token ids, EOT = argmax) and ``embed_tokens(tokens)`` (frozen word
  embeddings on the device); ``tokenizer`` for ``tokenizer.encode(name)`` (token counts).
- ``logit_scale``: already exponentiated (about 100 for OpenAI weights), fp32, frozen.
- Shape facts: ``embed_dim``, ``text_layers``, ``vision_layers``, ``text_width``, ``vision_width``,
  ``image_size``, ``patch_count`` (patches, without CLS), ``text_context_length``.
- ``autocast()``: the run's compute context (the harness already wraps train_step, prepare_eval and
  predict in it); ``fp32()``: leave it for logits and losses; ``device``, ``dtype``, ``precision``,
  ``image_spec``.

Templates: ``template`` (in :class:`SetupContext` and :func:`prepare_eval`) is a ``str.format``
pattern with one ``{}``; a class name is cleaned (``_`` becomes a space) before it is inserted:
``benchsuite.data.registry.format_template(template, classname)`` does exactly that.

Precision: the harness hands training and evaluation image features to methods in fp32. Every
value ``train_step`` returns and the logits of ``predict`` must be fp32 (compute them under
``backbone.fp32()``); another dtype is a ContractError naming method and hook. On CUDA with
``amp`` (fp16 autocast) the harness owns a ``torch.amp.GradScaler``: see :func:`MethodSpec.backward`.

Errors: a method raises ``benchsuite.errors.BenchsuiteError`` (one line, shown as is) for a bad
recipe value; any other exception fails the job, and the grid goes on (``run --fail-fast`` stops).
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


#: Values of ``Method.image_input`` (and of the recipe key ``image_input``).
IMAGE_INPUTS = ("features", "images", "images+features")


class Method:
    """Base class of a method plugin. Subclass it, set the attributes, implement hooks.

    Attributes
    ----------
    name:
        Registry name used on the command line and in results (lower-case, no spaces).
    summary:
        One line for ``benchsuite list methods``.
    image_input:
        What image input the method needs (a recipe may override it with the key ``image_input``):

        - ``"features"`` (default): features of the frozen, unprompted image encoder only
          (zero-shot, CoOp, CoCoOp, KgCoOp, ProGrad, ProDA). The harness computes them (fp32, raw),
          passes them as ``batch.image_features`` and may serve evaluation from the feature cache.
        - ``"images"``: augmented images only; the method runs ``ctx.backbone.encode_image`` itself
          (IVLP, MaPLe, GOPro: they prompt or tune the image encoder).
        - ``"images+features"``: images, plus at training time the frozen, unprompted encoder's fp32
          features of the same augmented images (PromptSRC's image consistency term), read from the
          shared training features when the method has no :func:`train_views` (so one grid pays
          them once, with its "features" methods). Evaluation gets images only.
    epoch_settings:
        Recipe keys measured in epochs (PromptSRC: ``("gpa_mean", "gpa_std")``). A protocol profile
        that scales ``epochs`` (toy protocols) scales these keys and ``warmup_epochs`` by the same
        factor, ``ctx.epoch_scale`` = scaled epochs / recipe epochs; an int stays an int (rounded
        up, so a positive setting stays >= 1), a float is multiplied exactly.
    min_batch_size:
        Smallest training batch the method accepts (GOPro's BatchNorm projector: 2). The loader
        merges a trailing batch smaller than this into the batch before it (so one batch per epoch
        may hold up to ``batch_size + min_batch_size - 1`` images); a training set smaller than
        ``min_batch_size`` is refused.
    extra_knowledge:
        What the method uses beyond the protocol's labelled few-shot images and the backbone, in a
        few words each, e.g. ``("larger teacher (ViT-L/14)",)``, ``("LLM class descriptions",)``,
        ``("unlabeled test-class images",)`` (PromptKD). Empty (the default) for methods that use
        nothing else. Recorded in every result and shown in the leaderboard, so such rows are never
        ranked silently against methods without it.
    transductive:
        True when the method sees test images (labelled or not) before predicting, beyond one
        image at a time; recorded and shown like ``extra_knowledge``.
    fit_views:
        Number of augmented views of every training image whose frozen features
        :func:`MethodSpec.fit_features` receives (Tip-Adapter's ``augment_epoch``: 10).
    setting:
        The evaluation setting the method's numbers belong to (contract v3), one of
        :data:`SETTINGS`: ``"inductive"`` (default: the labelled few-shot images and the backbone
        only), ``"transductive"`` (sees unlabelled test-class images; ``transductive = True``
        implies it), ``"teacher-distilled"`` (learns from a teacher trained beyond the protocol's
        data or on a larger backbone, PromptKD), ``"external-text"`` (LLM-written class
        descriptions or other text assets, CoPrompt). Recorded in every result as
        ``method.setting`` and shown on the leaderboard, where rows of different settings are
        marked, never ranked together silently.
    train_data:
        Which images the harness trains the method on (:data:`TRAIN_DATA`; contract v3):
        ``"fewshot"`` (default: the protocol's labelled few-shot sample of the training classes) or
        ``"unlabeled_all"`` (PromptKD's student): every image of the training dataset's train split,
        of all its classes (a base-to-new job's new classes included), without labels:
        ``batch.labels`` is all -1, and ``SetupContext.all_classnames`` names every class. The
        few-shot sample is still drawn (a dependency such as a teacher trains on it); the result
        records the unlabeled set in ``data.unlabeled``. Declare it in ``extra_knowledge`` too.
    """

    name: str = ""
    summary: str = ""
    image_input: str = "features"
    epoch_settings: tuple[str, ...] = ()
    min_batch_size: int = 1
    extra_knowledge: tuple[str, ...] = ()
    transductive: bool = False
    setting: str = "inductive"
    fit_views: int = 1
    train_data: str = "fewshot"


#: Values of ``Method.train_data``.
TRAIN_DATA = ("fewshot", "unlabeled_all")


#: Values of ``Method.setting``.
SETTINGS = ("inductive", "transductive", "teacher-distilled", "external-text")


def method_setting(cls: type) -> str:
    """The setting a method's results are recorded under: its declared one, or ``transductive``
    for a method that declares only ``transductive = True``."""
    declared = getattr(cls, "setting", "inductive")
    return "transductive" if declared == "inductive" and getattr(cls, "transductive", False) else declared


#: Values of ``LabelSpace.kind``.
LABEL_SPACES = ("base", "new", "all", "mixed")


@dataclass(frozen=True)
class LabelSpace:
    """How an evaluation class set relates to the job's training classes (contract v3), given to
    :func:`MethodSpec.prepare_eval`, so that methods whose inference differs on seen and unseen
    classes (DePT, MMRL, 2SFS) switch on the harness's knowledge instead of dataset names.

    ``seen[i]``: class ``i`` of the evaluated set has the name of a training class (names cleaned,
    ``_`` -> space, compared case-insensitively; for domain generalization the ImageNet variants
    share ImageNet's names, so their classes are seen). ``kind``: ``"base"`` (only training
    classes: all of them, or a subset), ``"new"`` (none of them), ``"all"`` (every training class
    plus others) or ``"mixed"`` (some training classes plus others). ``same_dataset``: the evaluated set comes from the training dataset.
    """

    kind: str
    seen: tuple[bool, ...]
    same_dataset: bool
    train_dataset: str

    @classmethod
    def of(cls, train_dataset: str, train_classnames: list[str], dataset: str,
           classnames: list[str]) -> "LabelSpace":
        def clean(name: str) -> str:
            return name.replace("_", " ").strip().lower()

        trained = {clean(n) for n in train_classnames}
        seen = tuple(clean(n) in trained for n in classnames)
        covered = trained <= {clean(n) for n in classnames}
        kind = "base" if all(seen) else "new" if not any(seen) else "all" if covered else "mixed"
        return cls(kind, seen, dataset == train_dataset, train_dataset)


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
    #: scaled epochs / recipe epochs under a protocol profile (toy protocols), 1.0 for real protocols;
    #: for epoch-indexed settings the method computes itself (the keys in `epoch_settings` are
    #: already scaled in `recipe`)
    epoch_scale: float = 1.0
    #: every class name of the training dataset, in label order (base2new: base then new classes), given
    #: only to a method whose ``Method.train_data`` is ``"unlabeled_all"``; None otherwise
    all_classnames: Optional[list[str]] = None
    #: the harness's resolver behind :meth:`trained_dependency` (``benchsuite.engine.dependencies``);
    #: None outside a runner job (unit tests pass their own object with a ``trained(method)`` method)
    dependencies: Any = None

    def trained_dependency(self, method: str) -> "TrainedDependency":
        """The trained module of another method's job on the same protocol, dataset, shots, seed and
        backbone (contract v3; PromptKD's PromptSRC teacher): a two-stage method's stage 2 consumes
        stage 1. The harness trains that job's module first if it is not stored yet (exactly as the
        method's own job would train it: its recipe, few-shot sample and seed; the caller's random
        streams are left untouched), stores it in ``RESULTS/_trained/``, loads it back from the
        stored file by its sha256, and records the dependency's job id and sha256 in the caller's
        result (``method.dependencies``). The returned module is frozen and in eval mode; use it
        through the returned method instance (e.g. ``dep.method.class_text_features()``), and keep
        it out of the module ``setup`` returns (it is not the caller's to train or save)."""
        if self.dependencies is None:
            from .errors import BenchsuiteError

            raise BenchsuiteError(f"method dependency {method!r}: this setup runs outside a benchsuite job, "
                                  f"which resolves trained dependencies (benchsuite run)")
        return self.dependencies.trained(method)

    def private_backbone(self) -> "Backbone":
        """A copy of the backbone that belongs to this job alone (contract v3), for methods that
        train or replace parts of the encoders (LayerNorms, the visual projection, LoRA on the
        attention): put it inside the module ``setup`` returns and unfreeze or wrap what the method
        tunes there; the harness then optimises those parameters, counts them in the result's
        ``trainable_params`` and saves them with the module. The shared ``backbone`` must never be
        changed (the harness checks it after every job and refuses the result of one that did)."""
        return self.backbone.private_copy()


@dataclass
class TrainedDependency:
    """What :meth:`SetupContext.trained_dependency` returns: the dependency's method instance after
    its ``setup`` with the stored trained state loaded (frozen, eval mode, on the job's device), its
    module, and the identity the caller's result records."""

    method: Method                #: the dependency's method instance (its hooks and helpers work on it)
    module: nn.Module             #: the module its setup returned, holding the loaded trained state
    job_id: str                   #: the dependency's own job id (what its own result would be filed under)
    sha256: str                   #: sha256 of the stored trained-state file the module was loaded from
    trained: bool                 #: True when this call trained it, False when a stored training was loaded


@dataclass
class TrainBatch:
    """One training batch, already on the device.

    ``images`` are augmented with the protocol's train transform, each sample's view drawn from the
    harness's keyed augmentation stream (run seed, epoch, sample index: the same view for every
    method). ``image_features`` is set by the harness (fp32, no grad, raw = not normalised, frozen
    unprompted encoder on these very views) when the method's image input is ``"features"`` or
    ``"images+features"``. A method of either input without :func:`train_views` reads them from the
    shared training features, computed once per epoch for every method of a grid; a ``"features"``
    method's ``images`` is then an empty tensor. ``views`` holds extra augmented views of the same images when the method
    asked for them through :func:`train_views` (GOPro, CoPrompt).
    """

    images: torch.Tensor
    labels: torch.Tensor
    image_features: Optional[torch.Tensor] = None
    views: list[torch.Tensor] = field(default_factory=list)


@dataclass
class EvalBatch:
    """One evaluation batch. ``"features"`` methods get ``image_features`` (fp32, raw, possibly from
    the feature cache) and no images; ``"images"`` and ``"images+features"`` methods get ``images``
    only (no frozen features at evaluation time)."""

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
        ``weight_decay`` (5e-4), ``warmup_epochs`` (1; must be shorter than ``epochs``),
        ``warmup_lr`` (1e-5), ``drop_last`` (False: every sample is used; True: the toolbox's
        rule, drop the last partial batch when the training set has at least one full batch),
        ``image_input`` (default ``Method.image_input``), ``model_selection`` ("last_epoch";
        anything else is refused unless the user explicitly allows it, and such results are
        marked as off-protocol). The whole dict is recorded and hashed into the result's
        ``config_hash``.
        """

    @hookspec(firstresult=True)
    def setup(self, ctx: SetupContext) -> nn.Module:
        """Build the method for the training classes and return the module holding its state.

        The harness moves the returned module to ``ctx.device``, optimises its parameters with
        ``requires_grad``, toggles its
        ``train()``/``eval()`` (the frozen backbone stays in eval mode unless the method puts it
        inside this module), and saves its ``state_dict()`` to share a training between protocols
        (cross_dataset and domain_generalization). Register class-dependent tensors (prompt
        prefix/suffix embeddings) as non-persistent buffers: they are rebuilt by
        :func:`prepare_eval` for every evaluation class set and must not be saved.
        Frozen teachers (zero-shot text features, a frozen image encoder) are built here too.

        Before a training, setup also runs once on a separate instance of the method for the
        one-batch check (random generators are restored afterwards): keep all state on the
        instance or in the returned module, and never modify the shared ``ctx.backbone``. Instance
        state that training changes must also go through :func:`training_state`.
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

        Every value is a scalar fp32 tensor (a loss part; ``"loss"`` is the total that is
        backpropagated); compute logits and losses in fp32 (``backbone.fp32()``). Each part's mean
        per epoch is recorded in the result and checked for finiteness. Runs under the harness's
        autocast context. Do not call ``.item()`` here (a Python float is refused): values are
        gathered lazily by the harness so a CUDA step never waits on the host.
        """

    @hookspec(firstresult=True)
    def backward(self, outputs: dict[str, torch.Tensor], model: nn.Module,
                 scaler: Optional["torch.amp.GradScaler"]) -> bool:
        """Turn the step's outputs into ``.grad`` of the parameters, before the optimizer step.

        The harness default calls ``outputs["loss"].backward()``, or
        ``scaler.scale(outputs["loss"]).backward()`` when ``scaler`` is not None (CUDA, fp16
        autocast). A method that edits gradients (ProGrad projects the task gradient against the
        teacher's) implements this hook, fills ``.grad`` itself, and returns True.

        What the harness expects from such a method: gradients are zeroed before each step; when
        ``scaler`` is not None, every backward pass the method runs goes through
        ``scaler.scale(t).backward()`` (or ``torch.autograd.grad(scaler.scale(t), ...)``), so that
        on return every ``.grad`` holds ``scaler.get_scale()`` times the intended gradient. Do not
        unscale, step or update: the harness then unscales (``scaler.unscale_``), skips the step
        when any gradient is inf/NaN (counted in the result as ``skipped_steps``), steps and
        updates the scale. Scale-invariant gradient surgery (ProGrad's projection) is correct on
        scaled gradients; anything that is not must divide by ``scaler.get_scale()`` (a host sync).
        """

    @hookspec(firstresult=True)
    def param_groups(self, module: nn.Module) -> list[dict[str, Any]]:
        """Optimizer parameter groups (contract v3; default: one group of every parameter of the
        module with ``requires_grad``, at the recipe's ``lr`` and ``weight_decay``).

        Each group is a dict with ``"params"`` (a list of parameters of ``module``) and optionally
        ``"lr"`` (the group's base learning rate: the harness's schedule scales it by the same
        factor as the recipe's ``lr``) and ``"weight_decay"``. Every trainable parameter must be in
        exactly one group; the harness refuses duplicates, foreign parameters and omissions. The
        optimizer itself comes from the recipe (``optimizer``: ``"sgd"`` (default), ``"adam"`` or
        ``"adamw"``; ``eps``, ``betas`` for the Adam family; ``momentum`` for SGD); parameters
        stay fp32 masters under amp.
        """

    @hookspec
    def fit_features(self, features: torch.Tensor, labels: torch.Tensor, val_features: Optional[torch.Tensor],
                     val_labels: Optional[torch.Tensor]) -> None:
        """Build the method from frozen features of the few-shot training images (contract v3):
        training-free methods (Tip-Adapter's cache model) and methods that initialise from them
        (Tip-Adapter-F) implement it; the harness calls it after ``setup`` and before training.

        ``features``: fp32 ``[views, n_images, D]``, raw (not normalised) features of the frozen,
        unprompted image encoder, of the training images under ``views`` independent draws of the
        protocol's train augmentation (``Method.fit_views``; drawn from the job's seeded stream, so
        every run and resume sees the same views); ``labels``: ``[n_images]``. ``val_features``
        ``[n_val, D]`` and ``val_labels``: the job's few-shot validation split (training classes,
        test transform), where a method searches its hyper-parameters (never on the test set); None
        when the dataset has no validation split of its own (ImageNet's is its test set). Called
        under ``torch.no_grad()``; computed once per job, with one encoder pass per image and view.
        """

    @hookspec
    def epoch_end(self, epoch: int, num_epochs: int) -> None:
        """Called after every training epoch (e.g. PromptSRC's Gaussian prompt aggregation)."""

    @hookspec
    def training_state(self) -> Optional[dict[str, Any]]:
        """What the method changed during training outside its module's parameters and buffers, or
        None when there is nothing (e.g. PromptSRC's running aggregation sum, ProDA's prompt-order
        generator and the rest of its permutation).

        A job's epoch checkpoint (``benchsuite.engine.checkpoint``) saves the module's
        ``state_dict()``, the optimizer and the global RNGs; anything else would restart from
        ``setup`` when a pre-empted job resumes, and its result would silently differ from an
        uninterrupted run's. So a method holding such state must implement this hook and
        :func:`load_training_state`; a method keeping everything in its module needs neither.

        Called after :func:`epoch_end` at every epoch boundary of a checkpointed training (every
        training the runner does); the answer is kept, as a detached CPU copy and by plugin name, in
        the job's checkpoint. Values: tensors and plain Python data only (dict with str or int keys,
        list, tuple, str, int, float, bool, None), since the checkpoint is
        read with ``torch.load(weights_only=True)``; anything else is a ContractError at the first
        epoch boundary, as is a state without a :func:`load_training_state` to take it back.
        """

    @hookspec
    def load_training_state(self, state: dict[str, Any]) -> None:
        """Take back what :func:`training_state` returned at the saved epoch boundary (tensors on the
        CPU). Called only when a job resumes: after ``setup``, after the module, optimizer and RNGs are
        restored, before the first remaining epoch."""

    @hookspec
    def train_end(self) -> None:
        """Called once after the last epoch, before evaluation (e.g. load aggregated weights)."""

    @hookspec(firstresult=True)
    def prepare_eval(self, classnames: list[str], dataset: str, template: str, label_space: LabelSpace) -> None:
        """Rebuild the classifier for an evaluation class set (base, new, another dataset).

        Methods whose text side does not depend on the image compute their class text features
        once here, not once per test batch. Called under ``torch.no_grad()`` and autocast.
        ``label_space`` (contract v3; ask for it only if the inference depends on it) says whether
        these classes are the training classes, disjoint from them or a superset, with a per-class
        seen mask (:class:`LabelSpace`).
        """

    @hookspec(firstresult=True)
    def predict(self, batch: EvalBatch) -> torch.Tensor:
        """fp32 logits [B, n_classes] for the class set of the last :func:`prepare_eval`."""


class HarnessDefaults:
    """The harness's own implementations, registered ``trylast`` so a method's answer wins."""

    @hookimpl(trylast=True)
    def train_views(self, image_spec: "ImageSpec") -> list[Callable]:
        return []

    @hookimpl(trylast=True)
    def backward(self, outputs: dict[str, torch.Tensor], model: nn.Module, scaler) -> bool:
        loss = outputs["loss"]
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return True

    @hookimpl(trylast=True)
    def setup(self, ctx: SetupContext) -> nn.Module:
        return nn.Module()


#: Hooks a method must implement itself (everything else has a harness default or is optional).
REQUIRED_HOOKS = ("recipe", "prepare_eval", "predict")
#: Hooks required when the resolved recipe trains (epochs > 0).
TRAINING_HOOKS = ("train_step",)
