"""CLIP-Adapter parity: the official `clip_adapter.py` CustomCLIP beside the `clip_adapter` plugin, fp32, CPU.

    python parity/clip_adapter_parity.py --official /path/to/CLIP-Adapter --clip-from /path/to/CoOp

The official trainer file (gaopengcuhk/CLIP-Adapter, at the repository root) is meant to be dropped
into CoOp's ``trainers/`` and imports CoOp's ``clip`` package: ``--clip-from`` names the clone whose
``clip/`` it uses (KaiyangZhou/CoOp). Both sides load the same tiny OpenAI-shaped weights
(`parity/tiny_clip.py`) with a 1024-wide embedding, since the official module hard-codes
``Adapter(1024, 4)``. The adapter is drawn by each side under the same seed (the draws are compared:
same layout, same order, same default initialisation). Classes and template are OxfordPets'
(``CUSTOM_TEMPLATES['OxfordPets']``). Printed: image features, class text features, the initial
adapter, test logits, the training loss, the adapter's gradients, and the adapter after one and after
two SGD steps (lr 0.002, momentum 0.9, weight decay 5e-4; the harness's optimizer on the plugin side),
each as a relative error with tolerance 1e-5. Exit status 0 when everything is within tolerance.

Shims while the official code runs (nothing of it is changed): ``.cuda()`` is a no-op
(`official_import.official_runtime`) and ``Tensor.to('cuda')`` (the text encoder moves its tokens
there) stays on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_import import cfg, load_trainer, local_weights, official_runtime  # noqa: E402
from tiny_clip import benchsuite_backbone, make_state_dict, plugin_setup, report  # noqa: E402

from benchsuite.engine.train import make_optimizer  # noqa: E402
from benchsuite.hookspecs import EvalBatch, TrainBatch  # noqa: E402

CLASSNAMES = ["abyssinian", "american_bulldog", "basset_hound", "british_shorthair", "great_pyrenees",
              "yorkshire_terrier"]
TEMPLATE = "a photo of a {}, a type of pet."
SIZE = 64
BATCH = 8
WIDTH = 1024


@contextlib.contextmanager
def cuda_strings_stay_on_cpu():
    """``tensor.to('cuda')`` returns the tensor itself while the official code runs (no GPU here)."""
    original = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and isinstance(args[0], (str, torch.device)) and str(args[0]).startswith("cuda"):
            return self
        return original(self, *args, **kwargs)

    torch.Tensor.to = to
    try:
        yield
    finally:
        torch.Tensor.to = original


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path, help="clone of gaopengcuhk/CLIP-Adapter")
    parser.add_argument("--clip-from", required=True, type=Path, help="clone of KaiyangZhou/CoOp (its clip/ package)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.clip_from / "clip" / "clip.py").is_file():
        raise SystemExit(f"{args.clip_from}/clip/clip.py: not found; pass a clone of KaiyangZhou/CoOp as --clip-from")
    sys.path.insert(0, str(args.clip_from.resolve()))

    shape = {"image_size": SIZE, "embed_dim": WIDTH}
    state = make_state_dict(seed=args.seed, **shape)
    official = load_trainer(args.official, "clip_adapter.py", "official_clip_adapter")
    local_weights(official.clip, state, Path(tempfile.mkdtemp(prefix="bs-clip-adapter-parity-")))
    config = cfg(DATASET={"NAME": "OxfordPets"}, MODEL={"BACKBONE": {"NAME": "ViT-B/16"}})
    with official_runtime(), cuda_strings_stay_on_cpu():
        clip_model = official.load_clip_to_cpu(config)
        clip_model.float()  # as the official build_model does
        torch.manual_seed(args.seed)
        ref = official.CustomCLIP(config, CLASSNAMES, clip_model).eval()
    for name, p in ref.named_parameters():  # the official trainer's requires_grad rule
        p.requires_grad_("adapter" in name)

    backbone = benchsuite_backbone(state, **shape)
    torch.manual_seed(args.seed)
    method, module, recipe = plugin_setup("clip_adapter", backbone, CLASSNAMES, dataset="oxford_pets",
                                          template=TEMPLATE, seed=args.seed)

    gen = torch.Generator().manual_seed(args.seed + 1)
    images = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen)
    labels = torch.randint(0, len(CLASSNAMES), (BATCH,), generator=gen)
    ok = True
    with torch.no_grad(), official_runtime(), cuda_strings_stay_on_cpu():
        ref_features = ref.image_encoder(images)
        ref_text = F.normalize(ref.text_encoder(), dim=-1)
    with torch.no_grad():
        features = backbone.encode_image(images)
    ok &= report("image features (frozen encoder)", features, ref_features)
    ok &= report("class text features (template)", method.text_features, ref_text)
    print(f"    state dict keys: plugin {sorted(module.state_dict())}, official {sorted(ref.adapter.state_dict())}")
    for key, value in ref.adapter.state_dict().items():
        ok &= report(f"initial adapter {key} (same seed)", module.state_dict()[key], value)

    with torch.no_grad(), official_runtime(), cuda_strings_stay_on_cpu():
        ref_logits = ref(images)
        method.prepare_eval(CLASSNAMES, "oxford_pets", TEMPLATE)
        logits = method.predict(EvalBatch(labels=labels, image_features=features))
    ok &= report("test logits", logits, ref_logits)

    ref_params = [p for p in ref.adapter.parameters() if p.requires_grad]
    ref_opt = torch.optim.SGD(ref_params, lr=recipe["lr"], momentum=0.9, weight_decay=5e-4, dampening=0,
                              nesterov=False)  # Dassl's build_optimizer for "sgd"
    opt = make_optimizer([p for p in module.parameters() if p.requires_grad], recipe)
    names = [n for n, _ in ref.adapter.named_parameters()]
    for step in (1, 2):
        with official_runtime(), cuda_strings_stay_on_cpu():
            ref_loss = F.cross_entropy(ref(images), labels)  # forward_backward's loss
        out = method.train_step(TrainBatch(images, labels, features), 0)
        ref_opt.zero_grad()
        ref_loss.backward()
        opt.zero_grad()
        out["loss"].backward()
        if step == 1:
            ok &= report("training loss (cross-entropy)", out["loss"], ref_loss)
            for name, p, q in zip(names, module.parameters(), ref_params):
                ok &= report(f"gradient of {name}", p.grad, q.grad)
        ref_opt.step()
        opt.step()
        for name, p, q in zip(names, module.parameters(), ref_params):
            ok &= report(f"{name} after {step} SGD step{'s' if step > 1 else ''}", p, q)
    print("parity OK" if ok else "parity FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
