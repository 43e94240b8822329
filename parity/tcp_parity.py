"""TCP parity: the official `trainers/tcp.py` CustomCLIP beside the `tcp` plugin, fp32, CPU.

    python parity/tcp_parity.py --official /tmp/official/TCP [--anchor fp32|fp16] [--dataset NAME ...]

Both sides load the same tiny OpenAI-shaped weights (`parity/tiny_clip.py`), shaped so the official code
runs unchanged: its meta-net reshapes to 512-wide tokens (``reshape(C, -1, 512)``), so the text width is
512, and its blocks inject the class-aware tokens at the hard-coded block 8, so the text tower has 10
blocks (8 and 9 run after the injection). One run per dataset (default: FGVCAircraft, StanfordCars,
UCF101, the datasets whose TCP templates differ most: "an aircraft {}." anchor, the tail without a
final period, the four context slots replacing "a photo of a" before "person doing {}.").

Printed per dataset, as relative errors with tolerance 1e-5: frozen image features, initial context
(both drawn first from the same seed), hand-crafted class features (anchor), the assembled prompt
embeddings (all 77 positions: template tails and tokenisation), the class-aware tokens (TKE), the text
features, test logits, then at one training step (context moved off its start so every term moves)
the logits, CE, the KG score, the loss CE + 8 * score, the gradients of ``ctx`` and of every meta-net
tensor, every learned tensor after one Adam step (lr 0.002, eps 1e-3 as the README's Dassl edit,
betas (0.9, 0.999), weight decay 5e-4; the harness's optimizer on the plugin side), and finally the
test logits of the stepped model on a *new* class set (the official side rebuilt for those classes and
given the stepped prompt learner, as its eval-only run does).

Not compared: the meta-net's initial weights. The official PromptLearner builds a second CLIP between
drawing the context and building the meta-net, which consumes the random stream; the plugin has no
second CLIP, so its meta-net is drawn from a different point of the stream. The official initial
meta-net is copied into the plugin (same shapes, same names) before anything else is compared.

The anchor (methods.md 7.12): the official PromptLearner loads a second CLIP and leaves it in fp16 (its
``load_clip_to_cpu`` never casts); the plugin computes it with the run's backbone (fp32 here).
``--anchor fp32`` (default) casts that second CLIP to fp32, the computation the plugin performs;
``--anchor fp16`` runs the official second CLIP unchanged (its fp16 features then feed the fp32 meta-net)
and shows the size of the fp16 anchor's difference (anchor 2.2e-3, text features 3e-5, meta-net
gradients 2e-3 on FGVCAircraft; beyond the tolerance, hence not the default).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_import import cfg, load_trainer, local_weights, official_runtime, stub_module  # noqa: E402
from tiny_clip import benchsuite_backbone, make_state_dict, official_model, plugin_setup, report  # noqa: E402

from benchsuite.engine.train import make_optimizer  # noqa: E402
from benchsuite.hookspecs import EvalBatch, TrainBatch  # noqa: E402

SHAPE = {"image_size": 64, "text_width": 512, "text_layers": 10, "layers": 2, "embed_dim": 64}
BATCH = 8
DATASETS = {  # benchsuite name: (official DATASET.NAME, training classes, new classes)
    "fgvc_aircraft": ("FGVCAircraft", ["707-320", "727-200", "737-200", "A300B4", "BAE 146-200", "Cessna 172",
                                       "DC-3", "F-16A/B", "Spitfire"], ["Boeing 717", "Tu-154", "Yak-42"]),
    "stanford_cars": ("StanfordCars", ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi TT RS Coupe 2012",
                                       "BMW M3 Coupe 2012", "Bugatti Veyron 16.4 Coupe 2009", "Fiat 500 Abarth 2012"],
                      ["Tesla Model S Sedan 2012", "smart fortwo Convertible 2012"]),
    "ucf101": ("UCF101", ["Apply_Eye_Makeup", "Archery", "Baby_Crawling", "Balance_Beam", "Band_Marching",
                          "Baseball_Pitch", "Basketball"], ["Yo_Yo", "Walking_With_Dog", "Writing_On_Board"]),
}


class RecordingCosine(torch.nn.CosineSimilarity):
    """Stands in for ``torch.nn.CosineSimilarity`` while the official forward runs: records its output,
    so the official KG score 1 - mean(cos) is read off the official computation."""
    seen: list[torch.Tensor] = []

    def forward(self, a, b):
        out = super().forward(a, b)
        RecordingCosine.seen.append(out)
        return out


def official_forward(ref, images, labels=None):
    saved = torch.nn.CosineSimilarity
    torch.nn.CosineSimilarity = RecordingCosine
    RecordingCosine.seen = []
    try:
        return ref(images, labels) if labels is not None else ref(images)
    finally:
        torch.nn.CosineSimilarity = saved


def build_official(official, config, classnames, state, seed: int):
    clip_model = official_model(official.clip.build_model, state)
    torch.manual_seed(seed)  # after building CLIP, whose initialisation draws from the stream
    with official_runtime():
        ref = official.CustomCLIP(config, classnames, clip_model)
    for name, p in ref.named_parameters():  # the official trainer's requires_grad rule
        p.requires_grad_("prompt_learner" in name)
    # --anchor fp16: the fp16 features feed the fp32 meta-net here (the official fp16 run halves it too)
    ref.prompt_learner.text_features = ref.ori_embedding = ref.prompt_learner.text_features.float()
    return ref


def run(official, args, dataset: str, state, backbone) -> bool:
    title, classnames, new_classes = DATASETS[dataset]
    print(f"--- {dataset} ({title}), {len(classnames)} training classes")
    config = cfg(TRAINER={"COOP": {"N_CTX": 4, "CTX_INIT": False, "CSC": False, "CLASS_TOKEN_POSITION": "end",
                                   "PREC": "fp32", "W": 1.0},
                          "COCOOP": {"PREC": "fp32"}},
                 DATASET={"NAME": title}, MODEL={"BACKBONE": {"NAME": "ViT-B/16"}},
                 INPUT={"SIZE": (SHAPE["image_size"],) * 2})
    ref = build_official(official, config, classnames, state, args.seed)
    torch.manual_seed(args.seed)
    template = "a photo of a {}."  # the dataset's CoOp template; TCP uses its own for these datasets
    method, module, recipe = plugin_setup("tcp", backbone, classnames, dataset=dataset, template=template,
                                          seed=args.seed)
    ok = report("initial context (same seed, drawn first)", module.ctx, ref.prompt_learner.ctx)
    module.meta_net.load_state_dict(ref.prompt_learner.meta_net.state_dict())  # see the docstring

    gen = torch.Generator().manual_seed(args.seed + 1)
    size = SHAPE["image_size"]
    images = torch.randn(BATCH, 3, size, size, generator=gen)
    labels = torch.randint(0, len(classnames), (BATCH,), generator=gen)
    with torch.no_grad():
        ref_features = ref.image_encoder(images)
        features = backbone.encode_image(images)
        ok &= report("image features (frozen encoder)", features, ref_features)
        ok &= report(f"anchor (official second CLIP in {args.anchor})", module.anchor,
                     ref.prompt_learner.text_features.float())
        ref_prompts, ref_tokens = ref.prompt_learner()
        ok &= report("prompt embeddings (77 positions)", module.prompts.assemble(module.ctx, cut=False), ref_prompts)
        ok &= report("class-aware tokens (TKE)", module.class_tokens(), ref_tokens)
        ref_text = ref.text_encoder(ref_prompts, ref_tokens, ref.weight, ref.tokenized_prompts)
        ok &= report("text features (normalised)", module.text_features(),
                     ref_text / ref_text.norm(dim=-1, keepdim=True))
        ref.prompt_learner.eval()
        ref_logits = official_forward(ref, images)
        method.prepare_eval(classnames, dataset, template)
        logits = method.predict(EvalBatch(labels=labels, image_features=features))
        ok &= report("test logits", logits, ref_logits)

    ref.prompt_learner.train()
    ref_params = [p for p in ref.prompt_learner.parameters() if p.requires_grad]
    ref_opt = torch.optim.Adam(ref_params, lr=recipe["lr"], weight_decay=5e-4, betas=(0.9, 0.999), eps=1e-3)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = make_optimizer(params, recipe)
    with torch.no_grad():  # move the context off its start so the KG term is not ~0
        noise = 0.05 * torch.randn(module.ctx.shape, generator=gen)
        module.ctx.add_(noise)
        ref.prompt_learner.ctx.add_(noise)
    ref_logits, ref_loss = official_forward(ref, images, labels)
    ref_kg = 1.0 - torch.mean(RecordingCosine.seen[-1])
    ref_ce = torch.nn.functional.cross_entropy(ref_logits, labels)
    out = method.train_step(TrainBatch(images, labels, features), 0)
    ok &= report("training logits", method.logits(features, module.text_features()), ref_logits)
    ok &= report("CE", out["ce"], ref_ce)
    ok &= report("KG score 1 - mean cos", out["kg"], ref_kg)
    ok &= report("training loss CE + 8 * score", out["loss"], ref_loss)
    ref_opt.zero_grad()
    ref_loss.backward()
    opt.zero_grad()
    out["loss"].backward()
    ref_named = dict(ref.prompt_learner.named_parameters())
    for name, p in module.named_parameters():
        ok &= report(f"gradient of {name}", p.grad, ref_named[name].grad)
    ref_opt.step()
    opt.step()
    for name, p in module.named_parameters():
        ok &= report(f"{name} after 1 Adam step", p, ref_named[name])

    # new classes: the official eval-only run rebuilds CustomCLIP for them and loads the prompt learner
    ref_new = build_official(official, config, new_classes, state, args.seed)
    learned = {k: v for k, v in ref.prompt_learner.state_dict().items() if k not in ("token_prefix", "token_suffix")}
    ref_new.prompt_learner.load_state_dict(learned, strict=False)
    ref_new.prompt_learner.eval()
    new_labels = labels % len(new_classes)
    with torch.no_grad():
        ref_logits = official_forward(ref_new, images)
        method.prepare_eval(new_classes, dataset, template)
        logits = method.predict(EvalBatch(labels=new_labels, image_features=features))
    ok &= report("new-class test logits after the step", logits, ref_logits)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path,
                        help="a clone of htyao89/Textual-based_Class-aware_prompt_tuning")
    parser.add_argument("--anchor", choices=["fp32", "fp16"], default="fp32",
                        help="precision of the official second CLIP that computes the anchor (default fp32)")
    parser.add_argument("--dataset", nargs="+", choices=sorted(DATASETS), default=list(DATASETS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    state = make_state_dict(seed=args.seed, **SHAPE)
    # the trainer imports the repository's top-level `clip` (unused), which reads `packaging` through
    # setuptools' `pkg_resources`, absent from current environments: the real `packaging` stands in
    import packaging.version

    stub_module("pkg_resources", packaging=packaging)
    official = load_trainer(args.official, "trainers/tcp.py")
    folder = Path(tempfile.mkdtemp(prefix="bs-tcp-parity-"))
    local_weights(official.clip, state, folder)
    if args.anchor == "fp32":
        loader = official.load_clip_to_cpu
        official.load_clip_to_cpu = lambda c: loader(c).float()
    backbone = benchsuite_backbone(state, **SHAPE)
    ok = True
    for dataset in args.dataset:
        ok &= run(official, args, dataset, state, backbone)
    print("parity OK" if ok else "parity FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
