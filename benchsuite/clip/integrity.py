"""The frozen backbone is shared by every job of a process: detect any change a job makes to it.

The contract hands methods the backbone's modules (prompted encoders need them), so a method can
unfreeze, edit or wrap them. Every later job in the process would then score on modified weights,
and the evaluation features computed from them would be cached under the pristine weights' key,
so even a later, clean process would publish wrong numbers. `BackbonePrint` records what must not
change, cheaply enough to take after every job:

- the layout: every parameter and buffer by name, with its tensor object, shape, dtype, device
  and requires_grad (a replaced, wrapped, added or unfrozen tensor shows here),
- the values: a checksum of every tensor's bits: CRC-32 for tensors in host memory, and on an
  accelerator two exact integer sums computed there (one host sync for the whole model), where a
  changed value always changes the plain sum and the position-weighted one catches moved values,
- the modes and hooks: which modules are in training mode, how many forward (pre-)hooks each has.

`changes(before, after)` lists the differences in words, naming the tensors.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn

#: period of the position weights of the device checksum
_PERIOD = 251
_INT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class TensorPrint:
    """What identifies one parameter or buffer (its values by the checksum pair)."""

    ident: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str
    requires_grad: bool
    checksum: tuple[int, int]


@dataclass(frozen=True)
class BackbonePrint:
    tensors: dict[str, TensorPrint]
    training: frozenset[str]  # modules in training mode
    hooks: dict[str, int]  # module name -> number of forward and forward-pre hooks (non-zero only)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as a flat integer tensor of the same element size (no copy when contiguous)."""
    flat = tensor.detach().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    return flat.view(_INT_VIEWS[flat.element_size()])


def _device_checksums(bits: torch.Tensor) -> torch.Tensor:
    """[plain sum, position-weighted sum] of the bits as integers, on their device, in int64 (which
    wraps on overflow and so stays an exact function of the bits): one read, no large temporary."""
    whole = (bits.numel() // _PERIOD) * _PERIOD
    columns = torch.zeros(_PERIOD, dtype=torch.int64, device=bits.device)
    if whole:
        columns += bits[:whole].view(-1, _PERIOD).sum(0, dtype=torch.int64)
    tail = bits[whole:].to(torch.int64)
    columns[: tail.numel()] += tail
    weights = torch.arange(1, _PERIOD + 1, dtype=torch.int64, device=bits.device)
    return torch.stack([columns.sum(), (columns * weights).sum()])


def _checksum(tensor: torch.Tensor) -> "torch.Tensor | tuple[int, int]":
    """CRC-32 of the bytes for host tensors (0.25 s for ViT-B/16 on 2 cores, against 2.8 s for the
    device sums there); the device sums elsewhere, which stay on the accelerator."""
    bits = _bits(tensor)
    if tensor.device.type == "cpu":
        return zlib.crc32(memoryview(bits.contiguous().numpy()).cast("B")), 0
    return _device_checksums(bits)


@torch.no_grad()
def backbone_print(model: nn.Module) -> BackbonePrint:
    """The print of `model` now (see the module docstring)."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    sums = [_checksum(t) if t.numel() else (0, 0) for _, t in named]
    on_device = [s for s in sums if isinstance(s, torch.Tensor)]
    gathered = iter(torch.stack([s.to(on_device[0].device) for s in on_device]).tolist() if on_device else [])
    host = [tuple(next(gathered)) if isinstance(s, torch.Tensor) else s for s in sums]  # one host sync
    tensors = {name: TensorPrint(id(t), tuple(t.shape), t.dtype, str(t.device), bool(t.requires_grad),
                                 (int(s[0]), int(s[1])))
               for (name, t), s in zip(named, host)}
    training = frozenset(name for name, m in model.named_modules() if m.training)
    hooks = {name: len(m._forward_hooks) + len(m._forward_pre_hooks)
             for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks}
    return BackbonePrint(tensors, training, hooks)


def changes(before: BackbonePrint, after: BackbonePrint, *, limit: int = 5) -> list[str]:
    """The differences between two prints in words, at most `limit` per kind (empty: unchanged)."""
    found: list[str] = []

    def add(kind: list[str]) -> None:
        found.extend(kind[:limit] + ([f"... and {len(kind) - limit} more"] if len(kind) > limit else []))

    gone = sorted(set(before.tensors) - set(after.tensors))
    new = sorted(set(after.tensors) - set(before.tensors))
    add([f"{name} was removed or renamed (a module was replaced?)" for name in gone])
    add([f"{name} is new (a module was added or wrapped?)" for name in new])
    altered: list[str] = []
    for name in sorted(set(before.tensors) & set(after.tensors)):
        a, b = before.tensors[name], after.tensors[name]
        if a.requires_grad != b.requires_grad:
            altered.append(f"{name} has requires_grad={b.requires_grad} (frozen: {a.requires_grad})")
        elif (a.shape, a.dtype, a.device) != (b.shape, b.dtype, b.device):
            altered.append(f"{name} is {b.dtype} {list(b.shape)} on {b.device} (was {a.dtype} {list(a.shape)} "
                           f"on {a.device})")
        elif a.checksum != b.checksum:
            altered.append(f"{name}: values changed")
        elif a.ident != b.ident:
            altered.append(f"{name} was replaced by another tensor")
    add(altered)
    modes = sorted(before.training ^ after.training)
    add([f"module {name or '<root>'} is in {'training' if name in after.training else 'eval'} mode"
         for name in modes])
    hooked = sorted(set(before.hooks) | set(after.hooks))
    add([f"module {name or '<root>'} has {after.hooks.get(name, 0)} forward hook(s) (had {before.hooks.get(name, 0)})"
         for name in hooked if before.hooks.get(name, 0) != after.hooks.get(name, 0)])
    return found
