"""The main job (``fastvq pipeline``, ``bash scripts/main.sh``): train the tiny unified tokenizers and the plain
VQ baseline for the same budget on the embedded default data, evaluate them against their untrained selves, then
train the tiny MLLM briefly on the UniTok just trained (:func:`mllm_pipeline_config`) and evaluate it against its
untrained self and the image-free baselines (``fastvq.eval.mllm``), train MergeAR briefly on the MergeVQ just
trained (:func:`mergear_pipeline_config`) and sample it against its untrained self, and write ``<out>/report.md``
(docs/training.md, "The main job").

Every model gets the same recipe (:func:`pipeline_config`): ``steps`` AdamW steps of 16 Fashion-MNIST images at
64 px, warm-up + cosine, the weight EMA, the discriminator from half-way, no perceptual term (its
EfficientNet-Lite0 forward at 224 px would cost more than the tokenizers themselves on 2 cores). The evaluation
uses the EMA weights on fixed fashion_mnist/val lists: PSNR/SSIM/usage on ``eval_n`` images, rFID/KID on ``fid_n``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastvq.train.config import TrainConfig
from fastvq.train.evaluate import evaluate_model, loss_curve_png

__all__ = ["PIPELINE_PRESETS", "pipeline_config", "run_pipeline", "measure_speed", "SPEED_PRESETS",
           "mllm_pipeline_config", "MLLM_TOKENIZER", "DEFAULT_MLLM_STEPS", "MLLM_EVAL", "mergear_pipeline_config",
           "MERGEAR_TOKENIZER", "DEFAULT_MERGEAR_STEPS", "MERGEAR_KEEPS"]

# The tokenizers the main job trains, in report order; a preset that is not registered on this checkout is
# reported as missing, never substituted.
PIPELINE_PRESETS = ("unitok-tiny", "mergevq-tiny", "vqgan-tiny")
# Every CPU-sized preset whose training speed the report measures (those registered at run time).
SPEED_PRESETS = ("unitok-tiny", "mergevq-tiny", "uniwetok-tiny", "vqrae-tiny", "vqgan-tiny", "vqgan-small")
DEFAULT_STEPS = 100
DEFAULT_FID_N = 32
# The op-speed subset of `python -m fastvq.bench --quick` the report runs: the ops these tokenizers train with
# (UniTok's multi-codebook search and gather, MergeVQ's LFQ entropy, the VQ EMA's segment sums) against their
# references and faiss. The whole quick run (97 cases) takes ~10 minutes on 2 loaded cores.
BENCH_SUBSET = ("(test_search_ and unitok) or test_gather or (test_entropy_loss and not reference) "
                "or (test_segment_sum and unitok)")
EVAL_N = 128
# The MLLM stage: mllm-tiny on the codes of the UniTok the job just trained, Fashion-MNIST with a little emoji and
# Tux Paint for captions; evaluated with MLLM_EVAL (KID on the trained and untrained models' own samples only: the
# TF-Inception forward costs ~0.5-1 s an image on 2 loaded cores).
MLLM_TOKENIZER = "unitok-tiny"
DEFAULT_MLLM_STEPS = 800
MLLM_DATA = "fashion_mnist:8192,emoji:1024,tuxpaint"
MLLM_EVAL = dict(caption_n=64, qa_n=200, per_class=3, kid_real_n=30, cfg_scale=3.0, cfg_scales=(1.0, 1.5, 3.0, 5.0),
                 baseline_kid=False)
# The MergeAR stage (docs/mergear.md): a small MergeAR on the tokens of the MergeVQ the job just trained, sampled for
# a few class prompts at two keep counts, scored by the cached classifier against its untrained initialisation.
MERGEAR_TOKENIZER = "mergevq-tiny"
DEFAULT_MERGEAR_STEPS = 250
MERGEAR_DATA = "fashion_mnist:1000"
MERGEAR_MODEL = dict(dim=128, num_layers=3, num_heads=4, num_kv_heads=2)
MERGEAR_KEEPS = (25, 49)
MERGEAR_PER_CLASS = 5            # generated images per class prompt and keep for the accuracy
MERGEAR_SHOW = (1, 3, 5, 9)      # the class prompts of the sample grids (trouser, dress, sandal, ankle boot)


def pipeline_config(preset: str, out: Path, steps: int) -> TrainConfig:
    """The one recipe every model of the main job is trained with."""
    return TrainConfig(preset=preset, model={"perceptual_weight": 0.0}, steps=steps, batch_size=16, lr=1e-3,
                       warmup_steps=max(1, steps // 10), log_every=max(1, steps // 30), eval_n=EVAL_N, fid_n=0,
                       out=str(out))


def mllm_pipeline_config(out: Path, tokenizer: Path, steps: int):
    """The main job's MLLM recipe (``fastvq.train.mllm.MLLMTrainConfig``)."""
    from fastvq.train.mllm import MLLMTrainConfig
    return MLLMTrainConfig(tokenizer=str(tokenizer), preset="mllm-tiny", data=MLLM_DATA, steps=steps, batch_size=16,
                           lr=1e-3, warmup_steps=max(1, steps // 20), log_every=max(1, steps // 30), eval_n=32,
                           out=str(out))


def _mllm_stage(out: Path, steps: int) -> dict:
    """Train the MLLM on ``out/unitok-tiny``, evaluate it and its untrained initialisation; the report's inputs."""
    from fastvq.data import load_dataset
    from fastvq.eval.mllm import CAPTION_SETS, cfg_sweep_png, codes_of, evaluate_mllm, images_grid_png
    from fastvq.train.mllm import MLLMTrainer, load_mllm, untrained_like
    cfg = mllm_pipeline_config(out / "mllm", out / MLLM_TOKENIZER, steps)
    t0 = time.time()
    trainer = MLLMTrainer(cfg)
    trainer.train()
    train_seconds = time.time() - t0
    history = [json.loads(line) for line in (out / "mllm" / "metrics.jsonl").read_text().splitlines()]
    train_log = [r for r in history if "loss" in r]
    mllm, tok = load_mllm(out / "mllm")
    fp = trainer.tokenizer_fingerprint
    train_captions = {n: s["captions"] for n, s in trainer.train_sets.items()}
    fm_labels = trainer.train_sets["fashion_mnist"]["labels"]
    results, eval_seconds = {}, {}
    for tag, model in (("untrained", untrained_like(mllm, cfg.seed)), ("trained", mllm)):
        print(f"fastvq pipeline: evaluating the MLLM ({tag})", file=sys.stderr)
        t1 = time.time()
        results[tag] = evaluate_mllm(model, tok, out / "mllm-eval", tag, train_captions=train_captions,
                                     train_labels=fm_labels, fingerprint=fp, **MLLM_EVAL)
        eval_seconds[tag] = time.time() - t1
    if all("cfg_sweep" in r for r in results.values()):
        cfg_sweep_png({f"mllm-tiny {t}": r["cfg_sweep"] for t, r in results.items()}, out / "mllm-eval" / "cfg.png",
                      ceiling=results["trained"].get("t2i_accuracy_reconstruction"))
    # a few held-out images with their captions (reference, trained, untrained)
    captions = []
    for name in CAPTION_SETS:
        key = f"caption_{name}"
        if key not in results["trained"]["samples"]:
            continue
        d = codes_of(tok, name, "val", MLLM_EVAL["caption_n"], fp, mllm)
        ds = load_dataset(name, "val", channels=3, image_size=tok.config.image_size)
        k = 6
        images_grid_png(ds.images(d["positions"][:k]), out / "mllm-eval" / f"held-out-{name}.png", ncol=k)
        captions.append({"set": name, "png": f"mllm-eval/held-out-{name}.png",
                         "rows": [dict(reference=a["reference"], trained=a["prediction"], untrained=b["prediction"])
                                  for a, b in zip(results["trained"]["samples"][key][:k],
                                                  results["untrained"]["samples"][key][:k])]})
    loss_curve = out / "mllm" / "loss_curve.png"
    from fastvq.train.mllm import loss_curve_png as mllm_loss_curve
    mllm_loss_curve(train_log, loss_curve, "mllm-tiny: training loss (all tasks and each)")
    ips = [r["images_per_s"] for r in train_log[1:]] or [r["images_per_s"] for r in train_log]
    return {"config": cfg.to_dict(), "train_seconds": train_seconds, "eval_seconds": eval_seconds,
            "results": results, "captions": captions, "items_per_s": sum(ips) / len(ips),
            "params": sum(p.numel() for p in mllm.parameters()), "text_vocab": mllm.config.text_vocab_size,
            "train_items": {n: len(s["captions"]) for n, s in trainer.train_sets.items()}}


def mergear_pipeline_config(out: Path, tokenizer: Path, steps: int, data: str = MERGEAR_DATA,
                            model: dict | None = None):
    """The main job's MergeAR recipe (``fastvq.models.mergear.MergeARTrainConfig``); ``data`` / ``model``: other
    data or ``MergeARConfig`` overrides (the tests' micro run)."""
    from fastvq.models.mergear import MergeARTrainConfig
    return MergeARTrainConfig(tokenizer=str(tokenizer), data=data, model=dict(model or MERGEAR_MODEL), steps=steps,
                              batch_size=32, lr=1e-3, warmup=max(1, steps // 10), log_every=max(1, steps // 15),
                              ckpt_every=0, out=str(out))


def _mergear_stage(out: Path, steps: int, **recipe) -> dict:
    """Train MergeAR on ``out/mergevq-tiny`` (``MergeARTrainer``, the ``fastvq train mergear`` code), then sample
    the trained model and its untrained initialisation at :data:`MERGEAR_KEEPS`: generated-image accuracy on the 10
    class prompts, sample grids for a few prompts, and the KV-cache rows and bytes of the compacted cache against
    the full-length one. The report's inputs."""
    from fastvq.eval.classifier import generated_image_accuracy
    from fastvq.eval.mllm import images_grid_png
    from fastvq.models.mergear import MergeAR, MergeARTrainer, generate_images
    from fastvq.train.mllm import class_prompt
    cfg = mergear_pipeline_config(out / "mergear", out / MERGEAR_TOKENIZER, steps, **recipe)
    t0 = time.time()
    trainer = MergeARTrainer(cfg, log=lambda m: print(m, file=sys.stderr))
    ckpt = trainer.train()
    train_seconds = time.time() - t0
    tok = trainer.tokenizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)                          # the initialisation the run started from
        untrained = MergeAR(trainer.model.config).eval()
    trained = trainer.model.eval()
    names = trained.config.class_names
    labels = torch.arange(10).repeat_interleave(MERGEAR_PER_CLASS)
    rows, grids = [], []
    t1 = time.time()
    for tag, model in (("untrained", untrained), ("trained", trained)):
        for keep in MERGEAR_KEEPS:
            g = torch.Generator().manual_seed(0)
            sample, stats = model.generate(labels.tolist(), keep=keep, cfg_scale=3.0, temperature=1.0, generator=g,
                                           return_stats=True)
            with torch.no_grad():
                x = ((model.decode(tok, sample).clamp(-1, 1) + 1) / 2).float()
            acc = generated_image_accuracy(x, labels)
            _, full = model.generate(labels.tolist(), keep=keep, cfg_scale=3.0, temperature=1.0,
                                     generator=torch.Generator().manual_seed(0), cache="static", return_stats=True)
            rows.append({"model": tag, "keep": keep, "accuracy": acc.value, "n": acc.n, "kv_rows": stats["kv_rows"],
                         "kv_bytes": stats["kv_bytes"], "full_kv_rows": full["kv_rows"],
                         "full_kv_bytes": full["kv_bytes"], "seconds": stats["seconds"],
                         "full_seconds": full["seconds"], "batch": stats["batch"]})
            if tag == "trained":
                pick = torch.cat([torch.nonzero(labels == c)[:4, 0] for c in MERGEAR_SHOW])
                png = f"mergear/samples-keep{keep}.png"
                images_grid_png(x[pick], out / png, ncol=4, scale=2)
                grids.append({"keep": keep, "png": png})
    # the command-line path on the checkpoint: one prompt, greedy, through generate_images
    greedy = {}
    for keep in MERGEAR_KEEPS:
        _, a = generate_images(ckpt, [class_prompt(names[1])], keep=keep, temperature=0.0)
        b = trained.generate([1], keep=keep, temperature=0.0, cache="none")
        greedy[keep] = bool(torch.equal(a.indices, b.indices) and torch.equal(a.source, b.source))
    log = [json.loads(line) for line in (out / "mergear" / "metrics.jsonl").read_text().splitlines()]
    return {"config": cfg.to_dict(), "steps": trainer.step, "train_seconds": train_seconds,
            "train_step_seconds": trainer.seconds, "encode_seconds": trainer.encode_seconds,
            "sample_seconds": time.time() - t1, "rows": rows, "grids": grids, "checkpoint": str(ckpt),
            "params": sum(p.numel() for p in trained.parameters()), "final": log[-1] if log else {},
            "greedy_compacted_equals_full_forward": greedy, "show": [names[c] for c in MERGEAR_SHOW],
            "model": trained.config.to_dict()}


def _machine() -> dict:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def measure_speed(preset: str, steps: int = 2, warmup: int = 1, batch_size: int = 16) -> dict:
    """Training images/s of ``preset`` (the pipeline's recipe with the discriminator on, fp32) over ``steps``
    timed optimizer steps after ``warmup``, and the share of CPU time spent in fastvq ops over one more step
    (``torch.profiler``: the self time of ``fastvq::*`` ops over the self time of all ops; profiled apart, so its
    overhead is not in the images/s)."""
    import tempfile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's C++ start/stop lines
    from torch.profiler import ProfilerActivity, profile

    from fastvq.train.trainer import Trainer
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dataclasses.replace(pipeline_config(preset, Path(tmp), warmup + steps + 1), batch_size=batch_size,
                                  disc_start=0, captions=True)
        t = Trainer(cfg, progress=False)
        t.model.train()

        def one_step():
            t._train_step()
            t.step += 1

        for _ in range(warmup):
            one_step()
        t0 = time.perf_counter()
        for _ in range(steps):
            one_step()
        seconds = time.perf_counter() - t0
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            one_step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ours = sum(e.self_cpu_time_total for e in events if e.key.startswith("fastvq::"))
    return {"preset": preset, "images_per_s": round(steps * batch_size / seconds, 2), "batch_size": batch_size,
            "steps": steps, "fastvq_op_share": round(ours / total, 4) if total else 0.0,
            "params": sum(p.numel() for p in t.model.parameters())}


def _bench_table(out: Path) -> str:
    """``python -m fastvq.bench --quick``'s table (its own process), or why there is none."""
    cmd = [sys.executable, "-m", "fastvq.bench", "--quick", "-k", BENCH_SUBSET, "--json", str(out / "bench.json")]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (out / "bench.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return f"`python -m fastvq.bench --quick -k ...` failed (exit {proc.returncode}); see bench.log\n"
    lines = proc.stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("case ")), 0)  # fastvq's summary table
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    table = "\n".join(lines[start:]).strip()
    return (f"`python -m fastvq.bench --quick -k \"{BENCH_SUBSET}\"` ({time.time() - t0:.0f} s, "
            f"OMP_NUM_THREADS={threads}; the full benchmark: `python -m fastvq.bench`, docs/benchmarks.md):\n\n"
            f"```\n{table}\n```\n")


def _fmt(v, digits=3) -> str:
    return "n/a" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def run_pipeline(out: str | Path = "runs/main", steps: int | None = None, presets: list[str] | None = None,
                 fid_n: int | None = None, bench: bool = True, mllm_steps: int | None = None,
                 mergear_steps: int | None = None) -> Path:
    """Train, evaluate and report; returns the path of ``report.md``. ``mllm_steps`` (default
    :data:`DEFAULT_MLLM_STEPS`; 0: no MLLM stage): the MLLM's optimizer steps, on :data:`MLLM_TOKENIZER` when it
    was trained. ``mergear_steps`` (default :data:`DEFAULT_MERGEAR_STEPS`; 0: no MergeAR stage): MergeAR's, on
    :data:`MERGEAR_TOKENIZER` when it was trained."""
    import fastvq.models as models
    from fastvq.train.trainer import Trainer, load_checkpoint_model
    out = Path(out)
    steps = steps or DEFAULT_STEPS
    fid_n = DEFAULT_FID_N if fid_n is None else fid_n
    wanted = list(presets or PIPELINE_PRESETS)
    available = [p for p in wanted if p in models.list_presets()]
    missing = [p for p in wanted if p not in available]
    if not available:
        raise ValueError(f"fastvq pipeline: none of {wanted} is registered; known: {models.list_presets()}")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t_start = time.time()
    timings, rows, figures = {}, [], []
    for preset in available:
        cfg = pipeline_config(preset, out / preset, steps)
        t0 = time.time()
        Trainer(cfg).train()
        timings[preset] = time.time() - t0
        history = [json.loads(line) for line in (out / preset / "metrics.jsonl").read_text().splitlines()]
        train_log = [r for r in history if "loss" in r]
        ips = [r["images_per_s"] for r in train_log[1:]] or [r["images_per_s"] for r in train_log]
        torch.manual_seed(cfg.seed)  # the initialisation the trained run started from
        for label, model, trained in (("untrained", models.from_preset(preset, **cfg.model), False),
                                      (f"trained {steps} steps (EMA)", load_checkpoint_model(out / preset), True)):
            print(f"fastvq pipeline: evaluating {preset} ({label})", file=sys.stderr)
            tag = f"{preset}-{'trained' if trained else 'untrained'}"
            m = evaluate_model(model.eval(), cfg.data, EVAL_N, fid_n, model.config.image_size, out / "eval", tag)
            rows.append({"preset": preset, "weights": label, "params": sum(p.numel() for p in model.parameters()),
                         "train_images_per_s": round(sum(ips) / len(ips), 2) if trained else None, **m})
            figures.append((f"{preset}, {label}", f"eval/{tag}-recon.png"))
        loss_curve_png(train_log, out / preset / "loss_curve.png", f"{preset}: training loss")
    mllm_steps = DEFAULT_MLLM_STEPS if mllm_steps is None else mllm_steps
    mllm = None
    if mllm_steps > 0 and MLLM_TOKENIZER in available:
        t0 = time.time()
        mllm = _mllm_stage(out, mllm_steps)
        timings["mllm-tiny (train + eval)"] = time.time() - t0
    elif mllm_steps > 0:
        mllm = {"skipped": f"{MLLM_TOKENIZER} was not trained in this run (presets {available})"}
    mergear_steps = DEFAULT_MERGEAR_STEPS if mergear_steps is None else mergear_steps
    mergear = None
    if mergear_steps > 0 and MERGEAR_TOKENIZER in available:
        t0 = time.time()
        mergear = _mergear_stage(out, mergear_steps)
        timings["mergear (train + sample)"] = time.time() - t0
    elif mergear_steps > 0:
        mergear = {"skipped": f"{MERGEAR_TOKENIZER} was not trained in this run (presets {available})"}
    speed = [measure_speed(p) for p in SPEED_PRESETS if p in models.list_presets()]
    bench_md = _bench_table(out) if bench else "(skipped: --no-bench)\n"
    total = time.time() - t_start
    (out / "results.json").write_text(json.dumps({"machine": _machine(), "rows": rows, "speed": speed,
                                                  "train_seconds": timings, "total_seconds": total,
                                                  "missing": missing, "mllm": mllm, "mergear": mergear},
                                                 indent=1, default=float) + "\n")
    path = out / "report.md"
    path.write_text(_report(rows, speed, timings, total, missing, steps, fid_n, figures, available, bench_md)
                    + _mllm_report(mllm) + _mergear_report(mergear))
    print(f"fastvq pipeline: wrote {path} ({total:.0f} s)", file=sys.stderr)
    return path


def _report(rows, speed, timings, total, missing, steps, fid_n, figures, presets, bench_md) -> str:
    m = _machine()
    cfg = pipeline_config("<preset>", Path("."), steps)
    lines = [
        "# fastvq main job: tiny tokenizers on Fashion-MNIST", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, torch {m['torch']}, "
        f"GPU: {m['gpu'] or 'none'}; load average at the end {m['load_average']}. Total {total:.0f} s.", "",
        f"Recipe (every model): {steps} AdamW steps of {cfg.batch_size} images (fashion_mnist/train, 64 px, "
        f"greyscale as RGB), lr {cfg.lr} with {cfg.warmup_steps} warm-up steps and cosine decay, weight EMA "
        f"{cfg.ema_decay}, PatchGAN discriminator (hinge, adaptive weight) from step {steps // 2}, no perceptual "
        "term; evaluation with the EMA weights.", "",
    ]
    if missing:
        lines += [f"Not registered on this checkout, so not trained: {', '.join(missing)}.", ""]
    lines += [
        "## Metrics", "",
        f"fashion_mnist/val, fixed lists (`fixed_subset(n, seed=0)`): PSNR (dB, mean of per-image values after "
        f"uint8 rounding), SSIM (Gaussian 11/1.5, per channel) and codebook usage over n = {EVAL_N}; rFID and KID "
        f"(TF-Inception pool3, 299 px) over N = {fid_n}: with so few images FID is biased upward and only comparable "
        "at the same N. Zero-shot (10 classes, 3 templates) and retrieval (mean of image→text and text→image "
        "R@1/R@5) only for models with a text tower (UniTok, against the frozen MiniLM tower).", "",
        "| model | weights | params | PSNR | SSIM | usage | perplexity | rFID | KID | zero-shot top-1 | retrieval | "
        "train img/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['weights']} | {r['params']:,} | {_fmt(r.get('psnr'), 2)} | "
                     f"{_fmt(r.get('ssim'))} | {_fmt(r.get('usage'))} | {_fmt(r.get('perplexity'), 1)} | "
                     f"{_fmt(r.get('rfid'), 1)} | {_fmt(r.get('kid'), 4)} | {_fmt(r.get('zero_shot_top1'))} | "
                     f"{_fmt(r.get('retrieval'))} | {_fmt(r.get('train_images_per_s'), 1)} |")
    lines += ["", "## Reconstructions", "", "Top row: originals; bottom row: reconstructions (encode → indices → "
              "decode_indices).", ""]
    lines += [f"**{title}**\n\n![{title}]({png})\n" for title, png in figures]
    lines += ["## Loss curves", ""]
    lines += [f"![{p}]({p}/loss_curve.png)\n" for p in presets]
    lines += ["## Training time", "", "| model | wall seconds (train + in-loop eval + checkpoints) |", "|---|---|"]
    lines += [f"| {p} | {s:.0f} |" for p, s in timings.items()]
    lines += ["", "## Training speed", "",
              "Images/s over 2 optimizer steps of 16 images after 1 warm-up step, discriminator on, fp32; "
              "fastvq-op share: self CPU time of `fastvq::*` ops over that of all ops in one more step "
              "(torch.profiler).", "",
              "| preset | params | images/s | fastvq-op share |", "|---|---|---|---|"]
    lines += [f"| {s['preset']} | {s['params']:,} | {s['images_per_s']} | {100 * s['fastvq_op_share']:.1f}% |"
              for s in speed]
    lines += ["", "## Op speed", "", bench_md]
    return "\n".join(lines) + "\n"


# (metric key, label, digits); the baselines' keys are the metric's key + a suffix
_MLLM_ROWS = [
    ("caption_fashion_mnist_bleu4", "captioning BLEU-4, fashion_mnist/val", 3),
    ("caption_fashion_mnist_cider", "captioning CIDEr-D, fashion_mnist/val", 3),
    ("caption_emoji_bleu4", "captioning BLEU-4, emoji/val (held out)", 3),
    ("caption_emoji_cider", "captioning CIDEr-D, emoji/val (held out)", 3),
    ("caption_tuxpaint_bleu4", "captioning BLEU-4, tuxpaint/val (held out)", 3),
    ("caption_tuxpaint_cider", "captioning CIDEr-D, tuxpaint/val (held out)", 3),
    ("qa_accuracy", "QA accuracy (\"what is this?\"), fashion_mnist/val", 3),
    ("t2i_accuracy", "text-to-image: generated-image accuracy (CFG 3)", 3),
    ("t2i_kid", "text-to-image: KID vs real fashion_mnist/val", 4),
]
_BASELINES = ("_most_frequent", "_majority", "_blank_image", "_unconditional", "_reconstruction")
_BASELINE_NAMES = {"_most_frequent": "most frequent training caption", "_majority": "majority class",
                   "_blank_image": "trained MLLM, blank grey image", "_unconditional": "trained MLLM, unconditional "
                   "(CFG 0)", "_reconstruction": "tokenizer reconstructions of real images (ceiling)"}


def _mllm_report(mllm: dict | None) -> str:
    if mllm is None:
        return ""
    if "skipped" in mllm:
        return f"\n## The MLLM\n\nNot trained: {mllm['skipped']}.\n"
    c, r = mllm["config"], mllm["results"]
    ev = MLLM_EVAL
    lines = [
        "", "## The MLLM (mllm-tiny on the UniTok codes)", "",
        f"Recipe: `fastvq train mllm --tokenizer {Path(c['tokenizer']).name} --data {c['data']}`: {c['steps']} AdamW "
        f"steps of {c['batch_size']} items (text-to-image : captioning : QA = {c['t2i_weight']} : "
        f"{c['caption_weight']} : {c['qa_weight']}), lr {c['lr']}, {c['warmup_steps']} warm-up steps, cosine; CFG "
        f"prompt dropout 0.1; {mllm['params']:,} parameters, text vocabulary {mllm['text_vocab']} WordPiece ids; "
        f"training items {mllm['train_items']} (codes cached once). Training {mllm['train_seconds']:.0f} s "
        f"({mllm['items_per_s']:.0f} items/s, code encoding included), evaluation "
        f"{mllm['eval_seconds']['trained']:.0f} s (trained) + {mllm['eval_seconds']['untrained']:.0f} s (untrained).",
        "",
        f"Evaluation (`fastvq.eval.mllm`, greedy text): captions on {ev['caption_n']} val images per set (fastvq's "
        f"BLEU-4 / CIDEr-D, one reference each), QA on {ev['qa_n']} fashion_mnist/val images (exact class name), "
        f"text-to-image on the 10 class prompts (\"A photo of a sneaker.\") x {ev['per_class']} samples (temperature "
        f"1) scored by the cached Fashion-MNIST classifier, KID (TF-Inception pool3) of those {10 * ev['per_class']} "
        f"samples against {ev['kid_real_n']} real fashion_mnist/val images. Small N: an accuracy over "
        f"{10 * ev['per_class']} images moves in steps of {1 / (10 * ev['per_class']):.3f}.", "",
        "| metric | untrained | trained | baselines (no image / no prompt) |", "|---|---|---|---|",
    ]
    for key, label, digits in _MLLM_ROWS:
        if key not in r["trained"]:
            continue
        base = [f"{_BASELINE_NAMES[s]}: {_fmt(r['trained'][key + s], digits)}" for s in _BASELINES
                if key + s in r["trained"]]
        lines.append(f"| {label} | {_fmt(r['untrained'].get(key), digits)} | {_fmt(r['trained'][key], digits)} | "
                     f"{'; '.join(base)} |")
    skipped = r["trained"].get("skipped") or {}
    if skipped:
        lines += ["", f"Caption sets not evaluated (packages missing): {', '.join(skipped)}."]
    lines += ["", "**Generated images** (rows: the 10 class prompts, T-shirt/top … ankle boot; CFG 3, seed 0)", "",
              "| untrained | trained |", "|---|---|",
              "| ![untrained](mllm-eval/untrained-t2i.png) | ![trained](mllm-eval/trained-t2i.png) |", "",
              "**CFG sweep** (generated-image accuracy against the CFG scale; dashed: the tokenizer's reconstructions)",
              "", "![cfg sweep](mllm-eval/cfg.png)", "", "**Captions of held-out images** (greedy)", ""]
    for cap in mllm["captions"]:
        lines += [f"{cap['set']}/val:", "", f"![{cap['set']}]({cap['png']})", "",
                  "| # | reference | trained | untrained |", "|---|---|---|---|"]
        lines += [f"| {i + 1} | {row['reference']} | {row['trained']} | {row['untrained'][:60]} |"
                  for i, row in enumerate(cap["rows"])]
        lines.append("")
    qa = r["trained"]["samples"].get("qa", [])
    if qa:
        lines += ["QA samples (trained): " + "; ".join(f"{s['answer']} → {s['prediction']}" for s in qa), ""]
    lines += ["![mllm loss](mllm/loss_curve.png)", ""]
    return "\n".join(lines) + "\n"


def _mergear_report(m: dict | None) -> str:
    if m is None:
        return ""
    if "skipped" in m:
        return f"\n## MergeAR\n\nNot trained: {m['skipped']}.\n"
    c, mc = m["config"], m["model"]
    final = m["final"]
    lines = [
        "", "## MergeAR (MergeVQ tokens with a compacted KV cache, docs/mergear.md)", "",
        f"Recipe: `fastvq train mergear --tokenizer {Path(c['tokenizer']).name} --data {c['data']} --steps "
        f"{c['steps']}` with `model.dim={mc['dim']}`, `num_layers={mc['num_layers']}` ({m['params']:,} parameters): "
        f"batch {c['batch_size']}, AdamW lr {c['lr']}, {c['warmup']} warm-up steps, keep counts drawn per sample from "
        f"{mc['keep_candidates']} with the tokenizer's probabilities. {m['steps']} steps in "
        f"{m['train_step_seconds']:.0f} s of training steps (encoding the images at every keep: "
        f"{m['encode_seconds']:.0f} s; stage total with checkpoint and sampling "
        f"{m['train_seconds'] + m['sample_seconds']:.0f} s). Last logged step {final.get('step')}: loss "
        f"{_fmt(final.get('loss'))} (slot {_fmt(final.get('slot_loss'))} + code {_fmt(final.get('code_loss'))}), "
        f"open/repeat accuracy {_fmt(final.get('open_accuracy'))}.", "",
        f"Generated-image accuracy (the cached Fashion-MNIST classifier) of {m['rows'][0]['n']} images "
        f"({MERGEAR_PER_CLASS} per class prompt, CFG 3, temperature 1, seed 0) and the KV cache of that batch "
        f"({m['rows'][0]['batch']} sequences with CFG): rows per sequence and bytes of the compacted cache "
        "(`CompressedKVCache`, first occurrences only) against LlamaGen's full-length cache under the merge mask "
        f"(same model, same draws). Chance is 0.1.", "",
        "| model | keep | accuracy | KV rows / seq. (compacted / full) | KV bytes (compacted / full) | "
        "generation s (compacted / full) |", "|---|---|---|---|---|---|",
    ]
    for r in m["rows"]:
        lines.append(f"| {r['model']} | {r['keep']}/64 | {r['accuracy']:.3f} | {r['kv_rows']} / {r['full_kv_rows']} | "
                     f"{r['kv_bytes'] / 1e6:.2f} / {r['full_kv_bytes'] / 1e6:.2f} MB | {r['seconds']:.2f} / "
                     f"{r['full_seconds']:.2f} |")
    eq = ", ".join(f"keep {k}: {'identical' if v else 'DIFFERENT'}" for k, v in
                   m["greedy_compacted_equals_full_forward"].items())
    lines += ["", f"Greedy `fastvq generate {Path(m['checkpoint']).parent.parent.name} \"A photo of a trouser.\" "
              f"--keep K` (compacted cache) against the full forward under `merge_causal_mask`: {eq} tokens and "
              "source maps.", "",
              f"**Samples of the trained MergeAR** (rows: {', '.join(m['show'])}; CFG 3, seed 0)", "",
              "| " + " | ".join(f"keep {g['keep']}/64" for g in m["grids"]) + " |",
              "|" + "---|" * len(m["grids"]),
              "| " + " | ".join(f"![keep {g['keep']}]({g['png']})" for g in m["grids"]) + " |", ""]
    return "\n".join(lines) + "\n"
