"""``python -m reference_model.eval`` / ``xray-eval``: evaluate a trained run, print the table,
write the metrics JSON.

    xray-eval --run runs/demo --out runs/demo/eval.json
    xray-eval --random-init tiny --n-images 64 --n-clips 14      # an untrained model (smoke)
"""

from __future__ import annotations

import argparse
import sys

from .suite import VARIANTS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xray-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a reference_model.train output folder (its stage "
                     "checkpoints are loaded with reference_model.train.load_models)")
    src.add_argument("--random-init", metavar="CONFIG",
                     help="evaluate an untrained model of this config (tiny, s16, ...)")
    p.add_argument("--out", help="write the metrics JSON here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ops", choices=("xray", "torch"), default=None,
                   help="build the models with these ops (default: as trained / xray)")
    p.add_argument("--size", type=int, default=None,
                   help="image size (default: the model config's img_size)")
    p.add_argument("--frames", type=int, default=None,
                   help="clip length (default: the model config's num_frames)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--no-robustness", action="store_true",
                   help="skip the noise / blur / FGSM blocks")
    p.add_argument("--no-fashion-mnist", action="store_true")
    p.add_argument("--n-images", type=int, default=400)
    p.add_argument("--n-clips", type=int, default=140)
    p.add_argument("--n-fmnist", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=1234)
    return p


def _random_models(config: str, ops: str | None):
    import torch

    import reference_model as rm
    from reference_model.text import create_text_tower

    torch.manual_seed(0)
    vit = rm.create_vit(config, ops=ops or "xray")
    clip = rm.CLIPModel(vit, create_text_tower("clip", vit.cfg, ops=ops or "xray"))
    return {"clip": clip, "hashtag": None, "vocab": None}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        print(f"xray-eval: --variants: unknown {unknown}; expected a subset of {VARIANTS}",
              file=sys.stderr)
        return 2
    if args.run:
        from reference_model.train import load_models

        models = load_models(args.run, device=args.device, ops=args.ops)
    else:
        models = _random_models(args.random_init, args.ops)
    clip = models.get("clip")
    if clip is None:
        print(f"xray-eval: {args.run}: the run has no CLIP stage checkpoint to evaluate",
              file=sys.stderr)
        return 2
    clip = clip.to(args.device)
    hashtag = models.get("hashtag")
    if hashtag is not None:
        hashtag = hashtag.to(args.device)
    cfg = clip.vit.cfg
    from .suite import evaluate

    evaluate(clip, hashtag_model=hashtag, vocab=models.get("vocab"),
             size=args.size or cfg.img_size, frames=args.frames or cfg.num_frames,
             variants=variants, robustness=not args.no_robustness,
             n_images=args.n_images, n_clips=args.n_clips, n_fmnist=args.n_fmnist,
             fashion_mnist=not args.no_fashion_mnist, seed=args.seed,
             batch_size=args.batch_size, device=args.device, out=args.out, show=True)
    if args.out:
        print(f"xray-eval: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
