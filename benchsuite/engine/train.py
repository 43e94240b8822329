"""The shared training loop: SGD, constant warm-up, epoch-stepped cosine, last-epoch model.

No host synchronisation inside a step: loss parts stay on the device and are gathered, recorded
and checked for finiteness once per epoch (a non-finite part stops the job with the method, epoch
and part named). On CUDA with fp16 autocast the loop owns a `torch.amp.GradScaler`; the optimizer
is then the fused SGD, which reads the scaler's inf flag on the device and skips the step itself
(the plain `GradScaler.step` would wait on the host for that flag).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pluggy
import torch
from torch import nn
from tqdm import tqdm

from ..errors import BenchsuiteError, ContractError
from ..hookspecs import TrainBatch
from .checkpoint import EpochCheckpoint, load_training_states, training_states
from .schedule import epoch_lr


class NonFiniteLoss(BenchsuiteError):
    """Training diverged; the job writes no result."""


@dataclass
class TrainStats:
    seconds: float
    images: int
    cpu_seconds: float = 0.0
    #: mean of every returned part ("loss" first) per epoch
    losses: dict[str, list[float]] = field(default_factory=dict)
    #: steps skipped by the GradScaler (inf/NaN gradients); 0 without a scaler
    skipped_steps: int = 0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_grad_scaler(backbone) -> Optional[torch.amp.GradScaler]:
    """A GradScaler where fp16 autocast runs (CUDA with `amp`); None elsewhere (fp32, bf16)."""
    if backbone.device.type == "cuda" and backbone.precision == "amp":
        return torch.amp.GradScaler("cuda")
    return None


def _check_outputs(method: str, outputs: Any) -> None:
    """Cheap Python checks of what train_step returned (no device sync)."""
    where = f"method {method!r}, hook train_step"
    if not isinstance(outputs, dict):
        raise ContractError(f"{where}: must return a dict with a tensor 'loss', got {type(outputs).__name__}")
    if "loss" not in outputs:
        raise ContractError(f"{where}: the returned dict has no 'loss' (keys: {', '.join(map(str, outputs)) or 'none'})")
    for key, value in outputs.items():
        if isinstance(value, (float, int)) and not isinstance(value, bool):
            raise ContractError(f"{where}: {key!r} is a {type(value).__name__}, not a tensor (was .item() called?); "
                                f"return the tensor itself, the harness gathers values once per epoch")
        if not isinstance(value, torch.Tensor):
            raise ContractError(f"{where}: {key!r} is a {type(value).__name__}; every value must be a scalar tensor")
        if value.dim() != 0:
            raise ContractError(f"{where}: {key!r} must be a scalar, got shape {tuple(value.shape)}")
        if value.dtype != torch.float32:
            raise ContractError(f"{where}: {key!r} is {value.dtype}, must be torch.float32; compute logits and "
                                f"losses in fp32 (inside `with backbone.fp32():`)")


def _non_finite(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """A device flag: does any (unscaled) gradient hold inf/NaN? Same test as the scaler's."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.bool)
    return torch.stack([~torch.isfinite(g).all() for g in grads]).any()


def train_step(pm: pluggy.PluginManager, method: str, module: nn.Module, optimizer: torch.optim.Optimizer, backbone,
               images: torch.Tensor, labels: torch.Tensor, views: list[torch.Tensor], image_input: str,
               epoch: int, scaler: Optional[torch.amp.GradScaler] = None,
               skipped: Optional[list[torch.Tensor]] = None,
               features: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """One optimisation step exactly as the loop runs it (also what `benchsuite bench` times).

    `image_input` follows `Method.image_input`: the frozen encoder's fp32 features are computed
    for "features" and "images+features", unless `features` hands them in (the shared training
    features; for a "features" method `images` is then an empty tensor). With a `scaler`, the
    device flag "this step was skipped" is appended to `skipped`.
    """
    device = backbone.device
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    views = [v.to(device, non_blocking=True) for v in views]
    with backbone.autocast():
        if features is None and image_input != "images":
            with torch.no_grad():
                features = backbone.encode_image(images).float()
        outputs = pm.hook.train_step(batch=TrainBatch(images, labels, features, views), epoch=epoch)
    _check_outputs(method, outputs)
    optimizer.zero_grad(set_to_none=True)
    pm.hook.backward(outputs=outputs, model=module, scaler=scaler)
    if scaler is None:
        optimizer.step()
    else:
        scaler.unscale_(optimizer)
        if skipped is not None:
            skipped.append(_non_finite(optimizer))
        scaler.step(optimizer)  # fused SGD: skips on the device flag, no host sync
        scaler.update()
    return outputs


#: Values of the recipe key ``optimizer`` (contract v3); "sgd" when the recipe does not name one.
OPTIMIZERS = ("sgd", "adam", "adamw")


def make_optimizer(params: "list[torch.nn.Parameter] | list[dict[str, Any]]", recipe: dict[str, Any], *,
                   fused: bool = False) -> torch.optim.Optimizer:
    """The recipe's optimizer over `params` (a parameter list or parameter groups).

    Default, Dassl's SGD: momentum 0.9, weight decay 5e-4, no dampening, no Nesterov (the recipe may
    change them). ``optimizer="adam"``/``"adamw"``: torch's Adam/AdamW with the recipe's ``eps``
    (default 1e-8; TCP and others need 1e-3) and ``betas`` (default [0.9, 0.999]). `fused` when a
    GradScaler drives it (the fused kernels honour the scaler's inf flag on the device)."""
    kind = recipe.get("optimizer", "sgd")
    extra = {"fused": True} if fused else {}
    if kind == "sgd":
        return torch.optim.SGD(params, lr=recipe["lr"], momentum=recipe["momentum"],
                               weight_decay=recipe["weight_decay"], dampening=0, nesterov=False, **extra)
    adam = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    return adam(params, lr=recipe["lr"], betas=tuple(recipe.get("betas", (0.9, 0.999))),
                eps=float(recipe.get("eps", 1e-8)), weight_decay=recipe["weight_decay"], **extra)


def parameter_groups(pm: pluggy.PluginManager, method: str, module: nn.Module,
                     recipe: dict[str, Any]) -> list[dict[str, Any]]:
    """The method's parameter groups (hook ``param_groups``) or one group of every trainable
    parameter; each with its base ``lr`` and ``weight_decay`` filled in, checked so that every
    trainable parameter of the module is optimised exactly once."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    groups = pm.hook.param_groups(module=module)
    if groups is None:
        groups = [{"params": trainable}]
    where = f"method {method!r}, hook param_groups"
    if not isinstance(groups, list) or not all(isinstance(g, dict) and "params" in g for g in groups):
        raise ContractError(f"{where}: must return a list of dicts, each with 'params'")
    known = {id(p) for p in trainable}
    seen: set[int] = set()
    out = []
    for index, group in enumerate(groups):
        unknown = set(group) - {"params", "lr", "weight_decay"}
        if unknown:
            raise ContractError(f"{where}: group {index} has unknown keys {sorted(unknown)}; allowed: params, lr, "
                                f"weight_decay")
        params = list(group["params"])
        for p in params:
            if id(p) not in known:
                raise ContractError(f"{where}: group {index} holds a parameter that is not a trainable parameter of "
                                    f"the module setup returned")
            if id(p) in seen:
                raise ContractError(f"{where}: a parameter is in more than one group (group {index})")
            seen.add(id(p))
        out.append({"params": params, "lr": float(group.get("lr", recipe["lr"])),
                    "weight_decay": float(group.get("weight_decay", recipe["weight_decay"]))})
    if seen != known:
        raise ContractError(f"{where}: {len(known - seen)} trainable parameter(s) of the module are in no group; "
                            f"freeze them (requires_grad=False) or add them to a group")
    for group in out:
        group["base_lr"] = group["lr"]
    return out


def iteration_lr(step: int, iterations: int, lr: float, min_lr: float = 0.0) -> float:
    """The rate of step `step` of an iteration budget: what torch's CosineAnnealingLR(T_max=iterations,
    eta_min=min_lr) gives after `step` scheduler steps (closed form)."""
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * step / iterations))


def set_group_lrs(optimizer: torch.optim.Optimizer, lr: float, recipe: dict[str, Any], in_warmup: bool) -> None:
    """The epoch's learning rate in every group: the constant warm-up rate, or each group's base rate
    scaled as the recipe's (one group at the recipe's lr gets exactly `lr`)."""
    for group in optimizer.param_groups:
        base = group.get("base_lr", recipe["lr"])
        group["lr"] = lr if in_warmup or base == recipe["lr"] else base * lr / recipe["lr"]


def _epoch_means(parts: dict[str, list[torch.Tensor]], skipped: list[torch.Tensor]) -> tuple[dict[str, float], int]:
    """Every part's mean over the epoch and the skipped-step count, in one host sync."""
    names = list(parts)
    values = [torch.stack(parts[k]).mean() for k in names]
    if skipped:
        values.append(torch.stack(skipped).sum().to(values[0].device, torch.float32))
    host = torch.stack(values).tolist() if values else []
    return dict(zip(names, host)), int(host[-1]) if skipped else 0


def _epoch_batches(loader, epoch: int, epoch_features: Optional[Callable[[int], tuple[torch.Tensor, torch.Tensor]]],
                   with_images: bool = False):
    """(images, labels, views, features) of one epoch: from the loader, or, with `epoch_features`,
    the loader's shuffled index batches gathered from that epoch's shared training features; with
    `with_images` too ("images+features"), the loader's image batches and, beside each, the shared
    features of the same samples (the same keyed views)."""
    sampler = getattr(loader, "batch_sampler", loader)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    if epoch_features is None:
        for images, labels, *views in loader:
            yield images, labels, (views[0] if views else []), None
        return
    features, labels = epoch_features(epoch)
    if with_images:
        issued = sampler.record()
        for images, batch_labels, *views in loader:
            index = torch.tensor(issued.popleft()).to(features.device, non_blocking=True)
            yield images, batch_labels, (views[0] if views else []), features[index]
        return
    empty = torch.empty(0, device=features.device)
    batches = list(sampler.index_batches())
    # the epoch's order goes to the device in one copy, not one per step
    order = torch.tensor([i for batch in batches for i in batch]).to(features.device, non_blocking=True)
    for index in order.split([len(batch) for batch in batches]):
        yield empty, labels[index], [], features[index]


def train(pm: pluggy.PluginManager, method: str, module: nn.Module, loader, recipe: dict[str, Any], backbone,
          image_input: str, *, progress: str = "", scaler: Optional[torch.amp.GradScaler] = None,
          checkpoint: EpochCheckpoint | None = None,
          epoch_features: Optional[Callable[[int], tuple[torch.Tensor, torch.Tensor]]] = None) -> TrainStats:
    """Train `module` for the recipe's budget; with `checkpoint`, resume from its saved epoch and
    hand it every epoch boundary, the plugins' `training_state` included (times, images, loss
    history and skipped steps count the interrupted attempts too).

    `epoch_features(e)` (a "features" or "images+features" method without extra views): the frozen
    features and labels of every training sample's epoch-e view (`training_features.TrainingFeatures`).
    For "features" the loader is then only a batch sampler and no image is decoded or encoded inside
    a step; for "images+features" the loader still brings the images, and the step gets the shared
    features of the same views instead of running the frozen encoder on them.

    Budget: ``epochs`` with Dassl's epoch-stepped schedule, or ``iterations`` optimizer steps (CLIP-LoRA,
    2SFS: the recipe's epochs are then 0): as many passes over the reshuffled training set as they
    need, the last one cut after exactly ``iterations`` steps, with a cosine learning rate stepped
    per iteration, ``lr * (1 + cos(pi * i / iterations)) / 2`` floored at ``min_lr`` as
    ``CosineAnnealingLR(T_max=iterations, eta_min=min_lr)`` computes it, and no warm-up. An epoch
    budget with ``lr_schedule="cosine_per_iteration"`` steps the same cosine over epochs x batches."""
    iterations = int(recipe.get("iterations", 0) or 0)
    steps_per_epoch = len(loader)
    epochs = math.ceil(iterations / steps_per_epoch) if iterations else int(recipe["epochs"])
    budget = f"{iterations} iterations" if iterations else f"{epochs} epochs"
    # per-iteration cosine: an iteration budget, or an epoch budget with lr_schedule="cosine_per_iteration"
    # (Tip-Adapter-F: CosineAnnealingLR over epochs x batches per epoch)
    cosine_steps = iterations or (epochs * steps_per_epoch if recipe.get("lr_schedule") == "cosine_per_iteration"
                                  else 0)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ContractError(f"method {method!r}, hook setup: the recipe trains for {budget} but the "
                            f"returned module has no parameter with requires_grad")
    optimizer = make_optimizer(parameter_groups(pm, method, module, recipe), recipe, fused=scaler is not None)
    device = backbone.device
    n_images, n_skipped, first_epoch, prior_seconds, prior_cpu = 0, 0, 0, 0.0, 0.0
    history: dict[str, list[float]] = {}
    resumed = checkpoint.restore(module, optimizer) if checkpoint is not None else None
    if resumed is not None:
        first_epoch, prior_seconds, n_images = int(resumed["epoch"]), float(resumed["seconds"]), int(resumed["images"])
        extra = resumed.get("extra", {})
        history = {k: list(v) for k, v in extra.get("losses", {}).items()}
        n_skipped, prior_cpu = int(extra.get("skipped_steps", 0)), float(extra.get("cpu_seconds", 0.0))
        if scaler is not None and extra.get("scaler"):
            scaler.load_state_dict(extra["scaler"])
        load_training_states(pm, resumed.get("training_state", {}))
    _synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(range(first_epoch, epochs), desc=progress or f"train {method}", unit="epoch", leave=False,
               disable=None)
    step = first_epoch * steps_per_epoch
    for epoch in bar:
        if not cosine_steps:
            lr = epoch_lr(epoch, epochs, recipe["lr"], warmup_epochs=recipe["warmup_epochs"],
                          warmup_lr=recipe["warmup_lr"])
            set_group_lrs(optimizer, lr, recipe, in_warmup=epoch < recipe["warmup_epochs"])
        module.train()
        parts: dict[str, list[torch.Tensor]] = {"loss": []}
        skipped: list[torch.Tensor] = []
        for images, labels, views, features in _epoch_batches(loader, epoch, epoch_features,
                                                              with_images=image_input == "images+features"):
            if iterations and step >= iterations:
                break
            if cosine_steps:
                lr = iteration_lr(step, cosine_steps, recipe["lr"], float(recipe.get("min_lr", 0.0)))
                set_group_lrs(optimizer, lr, recipe, in_warmup=False)
            step += 1
            outputs = train_step(pm, method, module, optimizer, backbone, images, labels,
                                 views, image_input, epoch, scaler, skipped, features=features)
            for key, value in outputs.items():
                parts.setdefault(key, []).append(value.detach().float())
            n_images += labels.shape[0]
            if checkpoint is not None:
                checkpoint.stop_if_signalled()  # a pre-emption signal is acted on here, between steps
        means, epoch_skipped = _epoch_means(parts, skipped)  # one host sync per epoch
        n_skipped += epoch_skipped
        for key, value in means.items():
            if not math.isfinite(value):
                what = "training loss" if key == "loss" else f"loss part {key!r}"
                raise NonFiniteLoss(f"method {method!r}: mean {what} of epoch {epoch + 1}/{epochs} is {value}; "
                                    f"lower the learning rate (--set lr=...) or check the method's loss")
            history.setdefault(key, []).append(value)
        bar.set_postfix({**{k: f"{v:.4f}" for k, v in means.items()}, "lr": f"{lr:.2e}"})
        pm.hook.epoch_end(epoch=epoch, num_epochs=epochs)
        if checkpoint is not None:
            extra = {"losses": history, "skipped_steps": n_skipped,
                     "cpu_seconds": prior_cpu + time.process_time() - cpu_start,
                     "scaler": scaler.state_dict() if scaler is not None else {}}
            checkpoint.epoch_done(epoch + 1, module, optimizer, images=n_images,
                                  seconds=prior_seconds + time.perf_counter() - start, extra=extra,
                                  training_state=training_states(pm))
    pm.hook.train_end()
    _synchronize(device)
    return TrainStats(seconds=prior_seconds + time.perf_counter() - start, images=n_images,
                      cpu_seconds=prior_cpu + time.process_time() - cpu_start, losses=history,
                      skipped_steps=n_skipped)
