"""Contrastive pretraining of the small CLIP shipped with benchsuite, on captioned toy-world images.

`benchsuite toy-pretrain` runs this and writes two files next to the shipped config:
- `bs-toy-clip.pt`: the open_clip state dict, stored in fp16 (token-embedding rows of words the
  pretraining never saw are zero, so the file compresses well in git and in the wheel);
- `bs-toy-clip.card.json`: seed, every setting, the loss curve and the zero-shot accuracy of the
  resulting checkpoint per toy dataset, measured through the same backbone loader users get.
The architecture is the open_clip config `bs-toy-clip.json` shipped beside them.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..clip.encoders import encode_text_embeddings
from ..data.transforms import CLIP_MEAN, CLIP_STD

HERE = Path(__file__).resolve().parent
MODEL_NAME = "bs-toy-clip"
CONFIG_PATH = HERE / f"{MODEL_NAME}.json"
CHECKPOINT_PATH = HERE / f"{MODEL_NAME}.pt"
CARD_PATH = HERE / f"{MODEL_NAME}.card.json"


@dataclass
class PretrainSettings:
    seed: int = 0
    pairs: int = 40000          #: distinct captioned images in the pretraining pool
    steps: int = 1500
    batch_size: int = 256
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 100
    crop_scale_min: float = 0.6  #: random-resized-crop lower scale during pretraining
    threads: int = 2


def register_config() -> None:
    """Make `bs-toy-clip` an open_clip model name (idempotent)."""
    import open_clip

    if MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_PATH)


def _pool(settings: PretrainSettings, size: int) -> tuple[torch.Tensor, list[str]]:
    """Render the pretraining pool once: uint8 images [N, 3, S, S] and their captions."""
    from .datasets import pretraining_pairs

    images, captions = [], []
    for image, text in tqdm(pretraining_pairs(settings.pairs, settings.seed), total=settings.pairs,
                            desc="render pretraining pairs", disable=None):
        arr = np.asarray(image.convert("RGB").resize((size, size)), dtype=np.uint8)
        images.append(torch.from_numpy(arr).permute(2, 0, 1))
        captions.append(text)
    return torch.stack(images), captions


def _augment(batch: torch.Tensor, size: int, scale_min: float, gen: torch.Generator) -> torch.Tensor:
    """Per-image random resized crop + flip on uint8 tensors, then CLIP normalisation."""
    out = torch.empty(batch.shape[0], 3, size, size)
    full = batch.shape[-1]
    for i, img in enumerate(batch):
        scale = scale_min + (1 - scale_min) * float(torch.rand((), generator=gen))
        side = max(8, int(round(full * math.sqrt(scale))))
        y, x = (int(torch.randint(0, full - side + 1, (), generator=gen)) for _ in range(2))
        crop = img[:, y:y + side, x:x + side].float().unsqueeze(0) / 255.0
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
        out[i] = crop.flip(-1) if float(torch.rand((), generator=gen)) < 0.5 else crop
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (out - mean) / std


def pretrain(settings: PretrainSettings, out_dir: Path = HERE) -> dict[str, Any]:
    """Train from scratch, save checkpoint + card, return the card."""
    import open_clip

    register_config()
    torch.set_num_threads(settings.threads)
    random.seed(settings.seed)
    np.random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    model = open_clip.create_model(MODEL_NAME, pretrained=None)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    started = time.time()
    images, captions = _pool(settings, 64)
    tokens = tokenizer(captions)
    eot = tokens.argmax(dim=-1)
    gen = torch.Generator().manual_seed(settings.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(settings.steps), desc="pretrain bs-toy-clip", disable=None)
    for step in bar:
        lr = settings.lr * (step + 1) / settings.warmup_steps if step < settings.warmup_steps else \
            settings.lr * 0.5 * (1 + math.cos(math.pi * (step - settings.warmup_steps) / (settings.steps - settings.warmup_steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, images.shape[0], (settings.batch_size,), generator=gen)
        x = _augment(images[idx], size, settings.crop_scale_min, gen)
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(encode_text_embeddings(model, model.token_embedding(tokens[idx]), eot[idx]), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.t()
        target = torch.arange(logits.shape[0])
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    seen = torch.zeros(model.token_embedding.weight.shape[0], dtype=torch.bool)
    seen[tokens.flatten()] = True
    seen[_downstream_tokens(tokenizer)] = True
    with torch.no_grad():
        model.token_embedding.weight[~seen] = 0.0
    state = {k: v.detach().half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / f"{MODEL_NAME}.pt"
    tmp = ckpt.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, ckpt)
    card = {
        "model": MODEL_NAME,
        "settings": asdict(settings),
        "minutes": round((time.time() - started) / 60, 1),
        "loss_every_100_steps": [round(float(np.mean(losses[i:i + 100])), 4) for i in range(0, len(losses), 100)],
        "vocabulary_tokens_kept": int(seen.sum()),
        "zero_shot": zero_shot_table(ckpt),
    }
    (out_dir / f"{MODEL_NAME}.card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return card


def _downstream_tokens(tokenizer) -> torch.Tensor:
    """Tokens of every toy class name and template, kept even if a caption never used them."""
    from ..data.registry import DATASETS, format_template
    from .datasets import toy_classnames, toy_dataset_names

    texts = []
    for name in toy_dataset_names():
        texts += [format_template(DATASETS[name].template, c) for c in toy_classnames(name)]
    texts.append("X X X X X X X X X X X X X X X X")
    return tokenizer(texts).flatten().unique()


def zero_shot_table(checkpoint: Path, data_root: Path | None = None) -> dict[str, float]:
    """Zero-shot top-1 accuracy (%) on the test split of every toy dataset: the `zeroshot_clip`
    method, evaluated by the harness's own `evaluate`, on the checkpoint loaded by the public loader."""
    from ..clip.backbone import load_backbone
    from ..data import loaders
    from ..data.registry import get_dataset, load_dataset
    from ..data.transforms import test_transform
    from ..engine.evaluate import evaluate, image_batches
    from ..hookspecs import EvalBatch, SetupContext
    from ..methods import get_method, job_manager
    from ..protocols import load_protocol
    from .datasets import default_root, materialize, toy_dataset_names

    root = materialize(data_root or default_root())
    backbone = load_backbone(MODEL_NAME, str(checkpoint), precision="fp32", device="cpu")
    protocol = load_protocol("toy_few_shot")
    table: dict[str, float] = {}
    for name in toy_dataset_names():
        splits = load_dataset(name, root)
        pm, _ = job_manager(get_method("zeroshot_clip"))
        ctx = SetupContext(backbone=backbone, classnames=splits.classnames, dataset=name,
                           template=get_dataset(name).template, recipe={"epochs": 0}, protocol=protocol,
                           shots=0, seed=0, device=backbone.device)
        module = pm.hook.setup(ctx=ctx)
        loader = loaders.eval_loader(splits.test, test_transform(backbone.image_spec), 100, workers=0, pin_memory=False)
        batches = (EvalBatch(labels=b.labels, image_features=backbone.encode_image(b.images))
                   for b in image_batches(loader, backbone.device))
        result = evaluate(pm, "zeroshot_clip", module, batches, splits.classnames, name,
                          get_dataset(name).template, backbone)
        table[name] = round(result.accuracy, 2)
    return table
