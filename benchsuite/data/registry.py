"""The dataset registry: CLI name → folder, leaderboard title, CoOp template, layout and reader.

Templates are CoOp's `CUSTOM_TEMPLATES` (trainers/zsclip.py); class names are inserted with "_"
replaced by a space, as every CoOp-family trainer does when it builds prompts.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import ContractError, DatasetError
from ..suggest import unknown
from . import readers
from .datum import DatasetSplits


@dataclass(frozen=True)
class DatasetSpec:
    """Everything benchsuite needs to know about one dataset."""

    name: str  # CLI name
    folder: str  # folder under the data root
    title: str  # CoOp's DATASET.NAME, used as the leaderboard column
    template: str  # CoOp CUSTOM_TEMPLATES entry, with "{}"
    layout: str  # one-line human description of the expected layout
    reader: Callable[[Path], DatasetSplits]
    test_only: bool = False
    sample_val: bool = True  # few-shot also samples val; CoOp's ImageNet does not (its val is the test set)
    #: for generated data (the toy world): returns the data root holding this dataset, creating it on
    #: first use, so that no --data-root is needed
    default_root: Optional[Callable[[], Path]] = None


DATASETS: dict[str, DatasetSpec] = {}
_plugins_loaded = False


def register_dataset(spec: DatasetSpec) -> None:
    """Add a dataset; a second registration under the same name is a bug, so it raises ValueError."""
    if spec.name in DATASETS:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    DATASETS[spec.name] = spec


def all_datasets() -> dict[str, DatasetSpec]:
    """Built-in datasets plus those plugins contribute (``benchsuite_datasets``), registered once."""
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        from ..methods import contributions  # lazy: plugin discovery imports the entry points

        for plugin, spec in contributions("benchsuite_datasets"):
            existing = DATASETS.get(spec.name)
            if existing is None:
                register_dataset(spec)
            elif existing != spec:
                raise ContractError(f"plugin {plugin.name!r} ({plugin.source}) registers dataset {spec.name!r}, "
                                    f"which is already registered differently; uninstall one")
    return DATASETS


def get_dataset(name: str) -> DatasetSpec:
    datasets = all_datasets()
    try:
        return datasets[name]
    except KeyError:
        raise DatasetError(unknown("dataset", name, datasets) + " (`benchsuite list datasets`)") from None


def load_dataset(name: str, data_root: Path) -> DatasetSplits:
    """Read `name` from `data_root/<folder>`; the result's `root` is its image root, `name` the CLI name."""
    spec = get_dataset(name)
    root = os.path.abspath(os.path.expanduser(os.fspath(data_root)))
    if not os.path.isdir(root):
        raise DatasetError(f"data root {root}{os.sep} does not exist or is not a folder; expected a folder "
                           f"holding the dataset folders, here {spec.layout}; {readers.HINT}")
    splits = spec.reader(Path(root) / spec.folder)
    return dataclasses.replace(splits, name=spec.name)


def clean_classname(name: str) -> str:
    """CoOp's prompt-time cleaning: underscores become spaces."""
    return name.replace("_", " ")


def format_template(template: str, classname: str) -> str:
    return template.format(clean_classname(classname))


_PHOTO = "a photo of a {}."
_BUILTIN = [
    ("imagenet", "imagenet", "ImageNet", _PHOTO, readers.read_imagenet, False),
    ("caltech101", "caltech-101", "Caltech101", _PHOTO, readers.read_caltech101, False),
    ("oxford_pets", "oxford_pets", "OxfordPets", "a photo of a {}, a type of pet.", readers.read_oxford_pets,
     False),
    ("stanford_cars", "stanford_cars", "StanfordCars", _PHOTO, readers.read_stanford_cars, False),
    ("oxford_flowers", "oxford_flowers", "OxfordFlowers", "a photo of a {}, a type of flower.",
     readers.read_oxford_flowers, False),
    ("food101", "food-101", "Food101", "a photo of {}, a type of food.", readers.read_food101, False),
    ("fgvc_aircraft", "fgvc_aircraft", "FGVCAircraft", "a photo of a {}, a type of aircraft.",
     readers.read_fgvc_aircraft, False),
    ("sun397", "sun397", "SUN397", _PHOTO, readers.read_sun397, False),
    ("dtd", "dtd", "DescribableTextures", "{} texture.", readers.read_dtd, False),
    ("eurosat", "eurosat", "EuroSAT", "a centered satellite photo of {}.", readers.read_eurosat, False),
    ("ucf101", "ucf101", "UCF101", "a photo of a person doing {}.", readers.read_ucf101, False),
    ("imagenetv2", "imagenetv2", "ImageNetV2", _PHOTO, readers.read_imagenetv2, True),
    ("imagenet_sketch", "imagenet-sketch", "ImageNetSketch", _PHOTO, readers.read_imagenet_sketch, True),
    ("imagenet_a", "imagenet-adversarial", "ImageNetA", _PHOTO, readers.read_imagenet_a, True),
    ("imagenet_r", "imagenet-rendition", "ImageNetR", _PHOTO, readers.read_imagenet_r, True),
]

for _name, _folder, _title, _template, _reader, _test_only in _BUILTIN:
    register_dataset(DatasetSpec(name=_name, folder=_folder, title=_title, template=_template,
                                 layout=readers.LAYOUTS[_name], reader=_reader, test_only=_test_only,
                                 sample_val=_name != "imagenet"))
