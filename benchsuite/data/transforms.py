"""The protocol's image transforms (methods.md 1.4), sized and normalised for the backbone."""

from __future__ import annotations

from dataclasses import dataclass

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageSpec:
    """What the transforms need to know about a backbone's input."""

    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


def train_transform(spec: ImageSpec) -> T.Compose:
    """Dassl's random_resized_crop (scale 0.08-1, bicubic, no Resize first) + flip + normalize."""
    return T.Compose([
        T.RandomResizedCrop(spec.size, scale=(0.08, 1.0), interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=0.5),
        T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])


def test_transform(spec: ImageSpec) -> T.Compose:
    """Resize the shorter side (bicubic), centre crop, normalize."""
    return T.Compose([
        T.Resize(spec.size, interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(spec.size),
        T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])


def describe(transform: T.Compose) -> str:
    """A stable one-line description recorded in results (the transform is part of the protocol)."""
    return " | ".join(repr(t).replace("\n", "").replace("    ", "") for t in transform.transforms)
