"""CoCoOp parity: the official `trainers/cocoop.py` CustomCLIP beside the `cocoop` plugin, fp32, CPU.

    python parity/cocoop_parity.py --official /work/official/CoOp

Both sides load the same tiny OpenAI-shaped weights (`parity/tiny_clip.py`) and the same classes; the
plugin's context comes from its own word initialisation (compared with the official one) and its
meta-net weights are copied from the official module. Printed: image features, the initial context,
test logits (eval mode: the official per-image loop vs the plugin's one batched call), the training
loss, every learnable tensor's gradient, and every learnable tensor after one SGD step (lr 0.002,
momentum 0.9, weight decay 5e-4; the harness's own optimizer on the plugin side), each as a relative
error with tolerance 1e-5. Exit status 0 when everything is within tolerance.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_import import cfg, load_trainer  # noqa: E402
from tiny_clip import benchsuite_backbone, make_state_dict, official_model, plugin_setup, report  # noqa: E402

from benchsuite.engine.train import make_optimizer  # noqa: E402
from benchsuite.hookspecs import EvalBatch, TrainBatch  # noqa: E402

CLASSNAMES = ["golden_retriever", "cat", "sea lion", "airplane_cabin", "1993 Geo Metro Convertible", "face",
              "water_lilly"]
SIZE = 64
BATCH = 4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path, help="clone of KaiyangZhou/CoOp")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    state = make_state_dict(seed=args.seed, image_size=SIZE)
    official = load_trainer(args.official, "trainers/cocoop.py", "official_cocoop")
    config = cfg(TRAINER={"COCOOP": {"N_CTX": 4, "CTX_INIT": "a photo of a", "PREC": "fp32"}},
                 INPUT={"SIZE": (SIZE, SIZE)})
    torch.manual_seed(args.seed)
    ref = official.CustomCLIP(config, CLASSNAMES, official_model(official.clip.build_model, state))
    for name, p in ref.named_parameters():  # the official trainer's requires_grad rule
        p.requires_grad_("prompt_learner" in name)

    backbone = benchsuite_backbone(state, image_size=SIZE)
    method, module, recipe = plugin_setup("cocoop", backbone, CLASSNAMES, seed=args.seed)
    module.meta_net.load_state_dict(ref.prompt_learner.meta_net.state_dict())

    gen = torch.Generator().manual_seed(args.seed + 1)
    images = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen)
    labels = torch.randint(0, len(CLASSNAMES), (BATCH,), generator=gen)
    ok = True
    with torch.no_grad():
        ref_features = ref.image_encoder(images)
        features = backbone.encode_image(images)
    ok &= report("image features (frozen encoder)", features, ref_features)
    ok &= report("initial context (word init)", module.ctx, ref.prompt_learner.ctx)

    ref.prompt_learner.eval()
    with torch.no_grad():
        ref_logits = ref(images)
        method.prepare_eval(CLASSNAMES, "caltech101", "a photo of a {}.")
        logits = method.predict(EvalBatch(labels=labels, image_features=features))
        method.batched = False
        loop_logits = method.predict(EvalBatch(labels=labels, image_features=features))
        method.batched = True
    ok &= report("test logits (batched)", logits, ref_logits)
    ok &= report("test logits (per-image loop switch)", loop_logits, ref_logits)

    ref.prompt_learner.train()
    module.train()
    ref_params = [p for p in ref.prompt_learner.parameters() if p.requires_grad]
    params = [p for p in module.parameters() if p.requires_grad]
    ref_opt = torch.optim.SGD(ref_params, lr=recipe["lr"], momentum=0.9, weight_decay=5e-4)
    opt = make_optimizer(params, recipe)
    ref_loss = ref(images, labels)
    loss = method.train_step(TrainBatch(images, labels, features), 0)["loss"]
    ok &= report("training loss", loss, ref_loss)
    ref_opt.zero_grad()
    ref_loss.backward()
    opt.zero_grad()
    loss.backward()
    ref_named = dict(ref.prompt_learner.named_parameters())
    for name, p in module.named_parameters():
        ok &= report(f"gradient of {name}", p.grad, ref_named[name].grad)
    ref_opt.step()
    opt.step()
    for name, p in module.named_parameters():
        ok &= report(f"after 1 SGD step: {name}", p, ref_named[name])
    print("parity OK" if ok else "parity FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        sys.exit(main())
