"""The ``fastvq`` command (also ``python -m fastvq``); docs/training.md.

    fastvq train tokenizer --preset unitok-tiny [--data fashion_mnist] [--set key=value ...] [--out runs/NAME]
                           [--resume [CKPT]] [--compile]
    fastvq eval tokenizer CKPT [--data fashion_mnist] [--n 64] [--fid-n 0] [--json PATH] [--no-ema]
    fastvq reconstruct CKPT in.png out.png [--no-ema]
    fastvq train mllm --tokenizer CKPT [--data fashion_mnist,emoji] [--set key=value ...] [--out runs/mllm]
                      [--resume [CKPT]]
    fastvq train mergear --tokenizer CKPT [--data fashion_mnist:4000] [--steps N | --seconds S] [--out DIR]
                         [--set key=value ...] [--resume [CKPT]]
    fastvq generate CKPT "a red heart" [--out heart.png] [--cfg 3] [--seed 0] [--num 4] [--temperature 1]
                    [--top-k 0] [--top-p 1] [--keep K (MergeAR checkpoints)]
    fastvq caption CKPT image.png [--question "what is this?"]
    fastvq eval mllm CKPT [--json PATH] [--caption-n 64] [--qa-n 200] [--per-class 4] [--kid-n 200]
                     [--no-untrained] [--no-baselines]
    fastvq pipeline [--out runs/main] [--steps N] [--presets a,b,c] [--fid-n N] [--mllm-steps N]
                    [--mergear-steps N]                                                         (the main job)
    fastvq presets

Under ``torchrun --nproc_per_node N -m fastvq train ...`` training runs DDP. The kernel benchmark is its own
command, ``python -m fastvq.bench``. Errors a user can fix (an unknown preset or data set, a missing or corrupt
checkpoint, a configuration that does not match on resume) print one ``fastvq: error: ...`` line and exit 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvq", description="fastvq: train, evaluate and run visual tokenizers "
                                     "(the kernel benchmark: python -m fastvq.bench)")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model")
    train.add_argument("what", choices=["tokenizer", "mllm", "mergear"], help="what to train")
    train.add_argument("--preset", default=None, help="a registered preset (fastvq presets; required for a "
                                                      "tokenizer; an MLLM preset for mllm, default mllm-tiny)")
    train.add_argument("--tokenizer", default=None, metavar="CKPT",
                       help="mllm, mergear: the frozen visual tokenizer (a run, checkpoint or save_pretrained "
                            "directory; mergear: a MergeVQ)")
    train.add_argument("--steps", type=int, default=None, help="optimizer steps (the same as --set steps=N)")
    train.add_argument("--seconds", type=float, default=None,
                       help="mergear: a training wall-clock budget in seconds (with --steps: whichever ends first)")
    train.add_argument("--data", default=None, help="a fastvq.data set (default fashion_mnist); mllm: "
                                                    "comma-separated sets, e.g. fashion_mnist,emoji,tuxpaint")
    train.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                       help="a TrainConfig (MLLMTrainConfig) field, or model.<field> of the preset's config "
                            "(repeatable)")
    train.add_argument("--out", default=None, help="run directory (default runs/<preset>)")
    train.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                       help="resume everything from CKPT (a run, checkpoints/ or step-* directory); without a value: "
                            "the latest checkpoint of --out")
    train.add_argument("--compile", action="store_true", help="torch.compile the model")

    ev = sub.add_parser("eval", help="evaluate a model")
    ev.add_argument("what", choices=["tokenizer", "mllm"])
    ev.add_argument("checkpoint", help="a run, checkpoints/, step-* or save_pretrained directory")
    ev.add_argument("--caption-n", type=int, default=64, help="mllm: val images per caption set")
    ev.add_argument("--qa-n", type=int, default=200, help="mllm: fashion_mnist/val images for QA accuracy")
    ev.add_argument("--per-class", type=int, default=4, help="mllm: generated images per class prompt")
    ev.add_argument("--kid-n", type=int, default=200, help="mllm: real images for KID (0: no KID)")
    ev.add_argument("--cfg", type=float, default=3.0, help="mllm: CFG scale of text-to-image")
    ev.add_argument("--cfg-scales", default="1,1.5,3,5", help="mllm: the CFG sweep ('' : none)")
    ev.add_argument("--no-baselines", action="store_true", help="mllm: skip the image-free baselines")
    ev.add_argument("--no-untrained", action="store_true", help="mllm: skip the untrained model (same config and "
                                                                "text vocabulary, seed 0)")
    ev.add_argument("--data", default="fashion_mnist")
    ev.add_argument("--n", type=int, default=64, help="validation images for PSNR, SSIM, usage, zero-shot")
    ev.add_argument("--fid-n", type=int, default=0, help="images for rFID/KID (0: skip; TF-Inception, ~0.5 s each "
                                                         "on 2 CPU cores)")
    ev.add_argument("--json", type=Path, default=None, help="write the metrics here (default: beside the table, "
                                                            "<checkpoint>/eval.json)")
    ev.add_argument("--no-ema", action="store_true", help="use the training weights, not the EMA")

    rc = sub.add_parser("reconstruct", help="encode and decode one image")
    rc.add_argument("checkpoint")
    rc.add_argument("input", type=Path)
    rc.add_argument("output", type=Path)
    rc.add_argument("--no-ema", action="store_true")

    gen = sub.add_parser("generate", help="generate images from a prompt with a trained MLLM or MergeAR")
    gen.add_argument("checkpoint", help="an MLLM or MergeAR run, checkpoints/, step-* or save_pretrained directory")
    gen.add_argument("prompt")
    gen.add_argument("--out", type=Path, default=Path("generated.png"), help="PNG (a grid when --num > 1)")
    gen.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1: none)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num", type=int, default=1, help="images to generate")
    gen.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0: off")
    gen.add_argument("--top-p", type=float, default=1.0, help="1: off")
    gen.add_argument("--no-ema", action="store_true", help="use the training weights, not the EMA")
    gen.add_argument("--keep", type=int, default=None,
                     help="MergeAR: the number of merge groups (one of its trained keep candidates; default the most "
                          "probable)")

    cap = sub.add_parser("caption", help="caption an image (or answer a question about it) with a trained MLLM")
    cap.add_argument("checkpoint")
    cap.add_argument("image", type=Path)
    cap.add_argument("--question", default=None, help="e.g. 'what is this?' (default: a caption)")
    cap.add_argument("--max-new-tokens", type=int, default=None,
                     help="default: the longest answer the model was trained on (max_text_len + [eos])")
    cap.add_argument("--no-ema", action="store_true")

    pipe = sub.add_parser("pipeline", help="the main job: train, evaluate, report (docs/training.md)")
    pipe.add_argument("--out", default="runs/main")
    pipe.add_argument("--steps", type=int, default=None, help="optimizer steps per model")
    pipe.add_argument("--presets", default=None, help="comma-separated presets to train")
    pipe.add_argument("--fid-n", type=int, default=None, help="images for rFID/KID")
    pipe.add_argument("--no-bench", action="store_true", help="skip python -m fastvq.bench --quick")
    pipe.add_argument("--mllm-steps", type=int, default=None, help="MLLM optimizer steps (0: no MLLM stage)")
    pipe.add_argument("--mergear-steps", type=int, default=None,
                      help="MergeAR optimizer steps on the MergeVQ just trained (0: no MergeAR stage)")

    sub.add_parser("presets", help="list the registered presets")
    return parser


def _train(args) -> int:
    import torch

    import fastvq.models as models
    from fastvq.train import TrainConfig, Trainer, apply_overrides
    if args.what == "mllm":
        return _train_mllm(args)
    if args.what == "mergear":
        return _train_mergear(args)
    if args.seconds is not None:
        raise ValueError("--seconds is for `fastvq train mergear`; use --steps (or --set steps=N)")
    if args.steps is not None:
        args.assignments = [*args.assignments, f"steps={args.steps}"]
    if args.tokenizer is not None:
        raise ValueError("--tokenizer is for `fastvq train mllm`; a tokenizer is trained with --preset")
    if args.preset is None:
        raise ValueError("fastvq train tokenizer: --preset is required (fastvq presets lists them)")
    if args.preset not in models.list_presets():
        raise ValueError(f"unknown preset {args.preset!r}; known: {models.list_presets()}")
    with torch.device("meta"):  # the preset's config types the model.<field> overrides; no memory
        preset_config = models.from_preset(args.preset).config
    cfg = TrainConfig(preset=args.preset, out=args.out or f"runs/{args.preset}", compile=args.compile)
    if args.data:
        cfg = dataclasses.replace(cfg, data=args.data)
    Trainer(apply_overrides(cfg, args.assignments, preset_config), resume=args.resume).train()
    return 0


def _train_mllm(args) -> int:
    from fastvq.models.mllm import MLLMConfig, list_mllm_presets
    from fastvq.train import apply_overrides
    from fastvq.train.mllm import MLLMTrainConfig, MLLMTrainer
    if args.compile:
        raise ValueError("fastvq train mllm: --compile is not supported for the MLLM trainer (its sequences have "
                         "ragged lengths every step)")
    preset = args.preset or "mllm-tiny"
    if preset not in list_mllm_presets():
        raise ValueError(f"fastvq train mllm: unknown MLLM preset {preset!r}; known: {list_mllm_presets()}")
    if not args.tokenizer:
        raise ValueError("fastvq train mllm: --tokenizer CKPT is required (the frozen visual tokenizer: a run, "
                         "checkpoint or save_pretrained directory, e.g. runs/main/unitok-tiny)")
    if args.seconds is not None:
        raise ValueError("--seconds is for `fastvq train mergear`; use --steps (or --set steps=N)")
    if args.steps is not None:
        args.assignments = [*args.assignments, f"steps={args.steps}"]
    cfg = MLLMTrainConfig(tokenizer=args.tokenizer, preset=preset, out=args.out or f"runs/{preset}")
    if args.data:
        cfg = dataclasses.replace(cfg, data=args.data)
    MLLMTrainer(apply_overrides(cfg, args.assignments, MLLMConfig), resume=args.resume).train()
    return 0


def _train_mergear(args) -> int:
    from fastvq.models.mergear import MergeARConfig, MergeARTrainConfig, MergeARTrainer
    from fastvq.train import apply_overrides
    if args.compile:
        raise ValueError("fastvq train mergear: --compile is not supported")
    if args.preset is not None:
        raise ValueError("fastvq train mergear: --preset does not apply (the model is sized with --set model.dim=..., "
                         "model.num_layers=...; the grid and keeps come from the tokenizer)")
    if not args.tokenizer:
        raise ValueError("fastvq train mergear: --tokenizer CKPT is required (a trained MergeVQ: a run, checkpoint "
                         "or save_pretrained directory, e.g. runs/main/mergevq-tiny)")
    cfg = MergeARTrainConfig(tokenizer=args.tokenizer, out=args.out or "runs/mergear")
    extra = [f"steps={args.steps}"] if args.steps is not None else []
    if args.seconds is not None:
        extra.append(f"seconds={args.seconds}")
        if args.steps is None:  # a time budget alone: no step limit
            extra.append(f"steps={10 ** 9}")
    if args.data:
        cfg = dataclasses.replace(cfg, data=args.data)
    cfg = apply_overrides(cfg, [*args.assignments, *extra], MergeARConfig)
    trainer = MergeARTrainer(cfg, resume=args.resume)
    path = trainer.train()
    print(f"fastvq train mergear: {trainer.step} steps in {trainer.seconds:.0f} s -> {path} "
          f"(fastvq generate {cfg.out} \"A photo of a trouser.\" --keep "
          f"{max(zip(trainer.model.config.keep_probs, trainer.model.config.keep_candidates))[1]})")
    return 0


def _generate_mergear(args) -> int:
    import torch

    from fastvq.eval.mllm import images_grid_png
    from fastvq.models.mergear import MergeAR, generate_images, resolve_mergear_checkpoint
    ckpt = resolve_mergear_checkpoint(args.checkpoint)
    cands = list(MergeAR.from_pretrained(ckpt).config.keep_candidates)
    if args.keep is not None and args.keep not in cands:
        raise ValueError(f"fastvq generate: --keep {args.keep} is not one of this MergeAR's trained keep candidates "
                         f"{cands} ({ckpt})")
    g = torch.Generator().manual_seed(args.seed)
    images, sample = generate_images(ckpt, [args.prompt] * args.num, keep=args.keep, cfg_scale=args.cfg,
                                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=g)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    images_grid_png(images, args.out, ncol=min(args.num, 8), scale=1 if args.num > 1 else 2)
    print(f"{args.prompt!r} -> {args.num} MergeAR image(s) of {images.shape[-1]}x{images.shape[-2]}, keep "
          f"{sample.keep} of {sample.source.shape[1]} tokens (cfg {args.cfg}, seed {args.seed}) -> {args.out}")
    return 0


def _generate(args) -> int:
    from fastvq.eval.mllm import generate_images, images_grid_png
    from fastvq.models.mergear import is_mergear_checkpoint
    from fastvq.train.mllm import load_mllm
    if not args.prompt.strip():
        raise ValueError("fastvq generate: the prompt is empty; give a description, e.g. \"a photo of a sneaker.\" "
                         "(unconditional samples: any prompt with --cfg 0)")
    if args.num < 1:
        raise ValueError(f"fastvq generate: --num must be >= 1, got {args.num}")
    if is_mergear_checkpoint(args.checkpoint):
        return _generate_mergear(args)
    if args.keep is not None and Path(args.checkpoint).exists():
        raise ValueError(f"fastvq generate: --keep applies to MergeAR checkpoints only; {args.checkpoint} is not one "
                         "(an MLLM generates every token position: no keep count)")
    mllm, tok = load_mllm(args.checkpoint, ema=not args.no_ema)
    images = generate_images(mllm, tok, [args.prompt] * args.num, cfg_scale=args.cfg, seed=args.seed,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    images_grid_png(images, args.out, ncol=min(args.num, 8), scale=1 if args.num > 1 else 2)
    print(f"{args.prompt!r} -> {args.num} image(s) of {tok.config.image_size}x{tok.config.image_size} "
          f"(cfg {args.cfg}, seed {args.seed}) -> {args.out}")
    return 0


def _load_image(path: Path, size: int, channels: int, who: str):
    """The image file ``path`` as ``[1, channels, size, size]`` in [-1, 1] (bicubic resize; alpha composited on
    white); a clear error when it is missing or not an image."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{who}: image {path} does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "P"):
                img = img.convert("RGBA")
                bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(bg, img)
            img = img.convert("RGB" if channels == 3 else "L").resize((size, size), Image.Resampling.BICUBIC)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{who}: cannot read {path} as an image ({type(e).__name__}: {e})") from None
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    return (x.permute(2, 0, 1) if x.dim() == 3 else x[None])[None] * 2 - 1


def _caption(args) -> int:
    import torch

    from fastvq.eval.mllm import _codec
    from fastvq.train.mllm import load_mllm
    if args.question is not None and not args.question.strip():
        raise ValueError("fastvq caption: --question is empty; leave it out for a caption")
    mllm, tok = load_mllm(args.checkpoint, ema=not args.no_ema)
    x = _load_image(args.image, tok.config.image_size, tok.config.in_channels, "fastvq caption")
    with torch.no_grad():
        codes = _codec(mllm).encode(tok, x)
        text = mllm.generate_text(codes, question=args.question,
                                  max_new_tokens=args.max_new_tokens or mllm.config.max_text_len + 1,
                                  temperature=0.0)[0]
    print(text)
    return 0


def _eval_mllm(args) -> int:
    from fastvq.eval.mllm import evaluate_mllm
    from fastvq.train.mllm import load_mllm, untrained_like
    mllm, tok = load_mllm(args.checkpoint, ema=not args.no_ema)
    scales = tuple(float(s) for s in args.cfg_scales.split(",") if s.strip())
    out_dir = args.json.parent if args.json else Path(args.checkpoint)
    models = [("trained", mllm)] + ([] if args.no_untrained else [("untrained", untrained_like(mllm, 0))])
    results = {}
    for tag, model in models:
        print(f"fastvq eval mllm: evaluating the {tag} model", file=sys.stderr)
        results[tag] = evaluate_mllm(model, tok, out_dir, f"eval-mllm-{tag}", caption_n=args.caption_n,
                                     qa_n=args.qa_n, per_class=args.per_class, kid_real_n=args.kid_n,
                                     cfg_scale=args.cfg, cfg_scales=scales,
                                     baselines=not args.no_baselines and tag == "trained")
    rows = [k for k, v in results["trained"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    width = max(len(k) for k in rows)
    print(f"{'metric':<{width}}  " + "  ".join(f"{t:>9}" for t in results))
    for k in rows:
        cells = [results[t].get(k) for t in results]
        print(f"{k:<{width}}  " + "  ".join(" " * 9 if v is None else f"{v:9.4f}" for v in cells))
    for tag, r in results.items():
        for row in r.get("cfg_sweep", []):
            print(f"{tag}: cfg {row['cfg_scale']:<4} generated-image accuracy {row['accuracy']:.4f} (n={row['n']})")
    path = args.json or out_dir / "eval-mllm.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"checkpoint": str(args.checkpoint), **results}, indent=1, default=float) + "\n")
    print(f"wrote {path} (+ eval-mllm-<model>-t2i.png, -cfg.png beside it)")
    return 0


def _print_table(metrics: dict) -> None:
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")


def _eval(args) -> int:
    if args.what == "mllm":
        return _eval_mllm(args)
    from fastvq.train import load_checkpoint_model
    from fastvq.train.evaluate import evaluate_model
    model = load_checkpoint_model(args.checkpoint, ema=not args.no_ema).eval()
    metrics = evaluate_model(model, args.data, args.n, args.fid_n, model.config.image_size)
    metrics["checkpoint"] = str(args.checkpoint)
    metrics["weights"] = "training" if args.no_ema else "ema (when the checkpoint has it)"
    _print_table(metrics)
    path = args.json or Path(args.checkpoint) / "eval.json"
    path.write_text(json.dumps(metrics, indent=1, default=float) + "\n")
    print(f"wrote {path}")
    return 0


def _reconstruct(args) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from fastvq.train import load_checkpoint_model
    model = load_checkpoint_model(args.checkpoint, ema=not args.no_ema).eval()
    if not args.input.is_file():
        raise FileNotFoundError(f"fastvq reconstruct: {args.input} does not exist")
    size = model.config.image_size
    mode = "RGB" if model.config.in_channels == 3 else "L"
    img = Image.open(args.input).convert(mode).resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    x = (x.permute(2, 0, 1) if x.dim() == 3 else x[None])[None] * 2 - 1  # [1, C, H, W] in [-1, 1]
    with torch.no_grad():
        out = model.encode(x)
        y = model.decode_indices(out.indices, out.extras)
    arr = ((y[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(args.output)
    print(f"{args.input} ({size}x{size}) -> {tuple(out.indices.shape)} tokens -> {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fastvq.data import MissingDependencyError
    from fastvq.train import CheckpointError, TrainingError
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "reconstruct":
            return _reconstruct(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "caption":
            return _caption(args)
        if args.command == "pipeline":
            from fastvq.train.pipeline import run_pipeline
            run_pipeline(args.out, steps=args.steps, presets=args.presets.split(",") if args.presets else None,
                         fid_n=args.fid_n, bench=not args.no_bench, mllm_steps=args.mllm_steps,
                         mergear_steps=args.mergear_steps)
            return 0
        if args.command == "presets":
            import fastvq.models as models
            print("\n".join(models.list_presets()))
            return 0
    except (ValueError, FileNotFoundError, CheckpointError, TrainingError, MissingDependencyError) as e:
        print(f"fastvq: error: {e}", file=sys.stderr)
        return 2
    return 1
