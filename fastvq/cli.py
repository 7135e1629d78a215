"""The ``fastvq`` command (also ``python -m fastvq``); docs/training.md.

    fastvq train tokenizer --preset unitok-tiny [--data fashion_mnist] [--set key=value ...] [--out runs/NAME]
                           [--resume [CKPT]] [--compile]
    fastvq eval tokenizer CKPT [--data fashion_mnist] [--n 64] [--fid-n 0] [--json PATH] [--no-ema]
    fastvq reconstruct CKPT in.png out.png [--no-ema]
    fastvq pipeline [--out runs/main] [--steps N] [--presets a,b,c] [--fid-n N]     (the main job)
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
    train.add_argument("what", choices=["tokenizer"], help="what to train")
    train.add_argument("--preset", required=True, help="a registered preset (fastvq presets)")
    train.add_argument("--data", default=None, help="a fastvq.data set (default fashion_mnist)")
    train.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                       help="a TrainConfig field, or model.<field> of the preset's config (repeatable)")
    train.add_argument("--out", default=None, help="run directory (default runs/<preset>)")
    train.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                       help="resume everything from CKPT (a run, checkpoints/ or step-* directory); without a value: "
                            "the latest checkpoint of --out")
    train.add_argument("--compile", action="store_true", help="torch.compile the model")

    ev = sub.add_parser("eval", help="evaluate a model")
    ev.add_argument("what", choices=["tokenizer"])
    ev.add_argument("checkpoint", help="a run, checkpoints/, step-* or save_pretrained directory")
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

    pipe = sub.add_parser("pipeline", help="the main job: train, evaluate, report (docs/training.md)")
    pipe.add_argument("--out", default="runs/main")
    pipe.add_argument("--steps", type=int, default=None, help="optimizer steps per model")
    pipe.add_argument("--presets", default=None, help="comma-separated presets to train")
    pipe.add_argument("--fid-n", type=int, default=None, help="images for rFID/KID")
    pipe.add_argument("--no-bench", action="store_true", help="skip python -m fastvq.bench --quick")

    sub.add_parser("presets", help="list the registered presets")
    return parser


def _train(args) -> int:
    import torch

    import fastvq.models as models
    from fastvq.train import TrainConfig, Trainer, apply_overrides
    if args.preset not in models.list_presets():
        raise ValueError(f"unknown preset {args.preset!r}; known: {models.list_presets()}")
    with torch.device("meta"):  # the preset's config types the model.<field> overrides; no memory
        preset_config = models.from_preset(args.preset).config
    cfg = TrainConfig(preset=args.preset, out=args.out or f"runs/{args.preset}", compile=args.compile)
    if args.data:
        cfg = dataclasses.replace(cfg, data=args.data)
    Trainer(apply_overrides(cfg, args.assignments, preset_config), resume=args.resume).train()
    return 0


def _print_table(metrics: dict) -> None:
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")


def _eval(args) -> int:
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
        if args.command == "pipeline":
            from fastvq.train.pipeline import run_pipeline
            run_pipeline(args.out, steps=args.steps, presets=args.presets.split(",") if args.presets else None,
                         fid_n=args.fid_n, bench=not args.no_bench)
            return 0
        if args.command == "presets":
            import fastvq.models as models
            print("\n".join(models.list_presets()))
            return 0
    except (ValueError, FileNotFoundError, CheckpointError, TrainingError, MissingDependencyError) as e:
        print(f"fastvq: error: {e}", file=sys.stderr)
        return 2
    return 1
