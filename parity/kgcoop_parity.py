"""KgCoOp parity: the official `trainers/kgcoop.py` CustomCLIP beside the `kgcoop` plugin, fp32, CPU.

    python parity/kgcoop_parity.py --official /work/official/KgCoOp/KgCoOp [--anchor fp32|fp16]

Both sides load the same tiny OpenAI-shaped weights (`parity/tiny_clip.py`) and DTD-style classes with
dataset DescribableTextures, so the anchor uses KgCoOp's own DTD template ("a photo of a {}, a type of
texture.", not CoOp's "{} texture."). The context is each side's own word initialisation ("a photo
of a"; compared). Printed: image features, initial context, anchor, test logits, the KG score, the
training loss CE + 8 * score, the context's gradient and the context after one SGD step (lr 0.002,
momentum 0.9, weight decay 5e-4; the harness's optimizer on the plugin side), as relative errors
with tolerance 1e-5.

The anchor (methods.md 7.12): the official PromptLearner loads a second CLIP and leaves it in fp16,
the plugin computes the anchor with the run's backbone (fp32 here). ``--anchor fp32`` (default) casts
that second official CLIP to fp32, the computation the plugin performs, which makes the comparison
exact; ``--anchor fp16`` runs the official code unchanged and shows the size of the fp16 anchor's
difference (expected around 1e-3, beyond the tolerance, hence not the default).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_import import cfg, load_trainer, local_weights, official_runtime  # noqa: E402
from tiny_clip import benchsuite_backbone, make_state_dict, official_model, plugin_setup, report  # noqa: E402

from benchsuite.engine.train import make_optimizer  # noqa: E402
from benchsuite.hookspecs import EvalBatch, TrainBatch  # noqa: E402

CLASSNAMES = ["banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "crystalline",
              "polka_dotted"]
SIZE = 64
BATCH = 8


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path, help="the KgCoOp/ folder of a clone of htyao89/KgCoOp")
    parser.add_argument("--anchor", choices=["fp32", "fp16"], default="fp32",
                        help="precision of the official second CLIP that computes the anchor (default fp32)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    state = make_state_dict(seed=args.seed, image_size=SIZE)
    official = load_trainer(args.official, "trainers/kgcoop.py", "official_kgcoop")
    folder = Path(tempfile.mkdtemp(prefix="bs-kgcoop-parity-"))
    local_weights(official.clip, state, folder)
    if args.anchor == "fp32":
        loader = official.load_clip_to_cpu
        official.load_clip_to_cpu = lambda c: loader(c).float()
    config = cfg(TRAINER={"COOP": {"N_CTX": 4, "CTX_INIT": True, "CSC": False, "CLASS_TOKEN_POSITION": "end",
                                   "PREC": "fp32", "W": 8.0},
                          "COCOOP": {"PREC": "fp32"}},
                 DATASET={"NAME": "DescribableTextures"}, MODEL={"BACKBONE": {"NAME": "ViT-B/16"}},
                 INPUT={"SIZE": (SIZE, SIZE)})
    torch.manual_seed(args.seed)
    with official_runtime():
        ref = official.CustomCLIP(config, CLASSNAMES, official_model(official.clip.build_model, state))
    for name, p in ref.named_parameters():  # the official trainer's requires_grad rule
        p.requires_grad_("ctx" in name)

    backbone = benchsuite_backbone(state, image_size=SIZE)
    method, module, recipe = plugin_setup("kgcoop", backbone, CLASSNAMES, dataset="dtd", template="{} texture.",
                                          seed=args.seed)

    gen = torch.Generator().manual_seed(args.seed + 1)
    images = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen)
    labels = torch.randint(0, len(CLASSNAMES), (BATCH,), generator=gen)
    ok = True
    with torch.no_grad():
        ref_features = ref.image_encoder(images)
        features = backbone.encode_image(images)
    ok &= report("image features (frozen encoder)", features, ref_features)
    ok &= report("initial context (word init)", module.ctx, ref.prompt_learner.ctx)
    ref_anchor = ref.ori_embedding.float()
    ok &= report(f"anchor (official second CLIP in {args.anchor})", module.anchor, ref_anchor)

    with torch.no_grad():
        ref_logits = ref(images)[0]
        method.prepare_eval(CLASSNAMES, "dtd", "{} texture.")
        logits = method.predict(EvalBatch(labels=labels, image_features=features))
    ok &= report("test logits", logits, ref_logits)

    ref_params = [p for p in ref.prompt_learner.parameters() if p.requires_grad]
    ref_opt = torch.optim.SGD(ref_params, lr=recipe["lr"], momentum=0.9, weight_decay=5e-4)
    opt = make_optimizer([module.ctx], recipe)
    with torch.no_grad():  # move the context off the template so the KG term is not ~0
        noise = 0.05 * torch.randn(module.ctx.shape, generator=gen)
        module.ctx.add_(noise)
        ref.prompt_learner.ctx.add_(noise)
    ref_logits, ref_score = ref(images)
    ref_loss = torch.nn.functional.cross_entropy(ref_logits, labels) + config.TRAINER.COOP.W * ref_score
    out = method.train_step(TrainBatch(images, labels, features), 0)
    ok &= report("KG score 1 - mean cos", out["kg"], ref_score)
    ok &= report("training loss CE + 8 * score", out["loss"], ref_loss)
    ref_opt.zero_grad()
    ref_loss.backward()
    opt.zero_grad()
    out["loss"].backward()
    ok &= report("gradient of ctx", module.ctx.grad, ref.prompt_learner.ctx.grad)
    ref_opt.step()
    opt.step()
    ok &= report("ctx after 1 SGD step", module.ctx, ref.prompt_learner.ctx)
    print("parity OK" if ok else "parity FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
