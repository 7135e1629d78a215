"""fastvq.train: schedule, config overrides, exact resume after SIGKILL, gradient accumulation, once-per-step
codebook and EMA updates, atomic checkpoints, bad input (corrupt / missing checkpoints, mismatched resume, unknown
preset or data set, a full disk, NaN losses), bf16, the CLI. A micro VQGAN (16 px, 8 x 8 tokens) on
Fashion-MNIST keeps every run to a fraction of a second per step."""
import errno
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastvq.cli import main as cli
from fastvq.models import VQGAN, VQGANConfig, register_preset
from fastvq.train import (CheckpointError, TrainConfig, Trainer, TrainingError, apply_overrides, lr_at,
                          resolve_checkpoint, write_checkpoint)
from fastvq.train.trainer import WeightEMA

REPO = Path(__file__).resolve().parents[1]
MICRO = {"image_size": 16, "base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "z_channels": 8,
         "codebook_size": 32, "mid_attention": False, "perceptual_weight": 0.0}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these micro models are 10x slower with 2 threads on a shared 2-core machine (OpenMP
    barriers), and the subprocesses below (OMP_NUM_THREADS=1) must compute exactly what this process does."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def micro_config(tmp_path, **kw) -> TrainConfig:
    base = dict(preset="vqgan-tiny", model=dict(MICRO), image_size=16, steps=6, batch_size=8, grad_accum=2,
                warmup_steps=2, log_every=1, ckpt_every=2, eval_n=8, captions=False, disc_start=2, disc_ndf=8,
                disc_layers=2, out=str(tmp_path / "run"))
    base.update(kw)
    return TrainConfig(**base)


def weights(ckpt: Path) -> dict:
    out = {}
    for name in ("model.safetensors", "ema.safetensors", "optim.safetensors"):
        out.update({f"{name}:{k}": v for k, v in load_file(str(ckpt / name)).items()})
    return out


def assert_bit_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def losses(run: Path) -> list:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


# ---- schedule and config ---------------------------------------------------------------------------------------------

def test_warmup_cosine_schedule_values():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way through the cosine
    assert lr_at(110, cfg) == pytest.approx(1e-4) and lr_at(500, cfg) == pytest.approx(1e-4)


def test_set_overrides_are_typed_and_errors_name_the_key():
    import fastvq.models as models
    preset = models.from_preset("vqgan-tiny").config
    cfg = apply_overrides(TrainConfig(), ["steps=7", "lr=2e-4", "precision=bf16", "betas=[0.5, 0.9]",
                                          "model.codebook_size=64", "model.channel_mult=[1, 2]", "captions=false"],
                          preset)
    assert (cfg.steps, cfg.lr, cfg.precision, cfg.betas, cfg.captions) == (7, 2e-4, "bf16", (0.5, 0.9), False)
    assert cfg.model == {"codebook_size": 64, "channel_mult": [1, 2]}
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="--set stepz: TrainConfig has no field 'stepz'"):
        apply_overrides(TrainConfig(), ["stepz=3"])
    with pytest.raises(ValueError, match="--set steps: expected int, got 'many'"):
        apply_overrides(TrainConfig(), ["steps=many"])
    with pytest.raises(ValueError, match="--set model.width: VQGANConfig has no field 'width'"):
        apply_overrides(TrainConfig(), ["model.width=3"], preset)
    with pytest.raises(ValueError, match="batch_size 8 must be a multiple of grad_accum 3"):
        TrainConfig(batch_size=8, grad_accum=3).validate()


def test_weight_ema_warmup_and_swap():
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema = WeightEMA(lin, decay=0.9)
    with torch.no_grad():
        lin.weight.fill_(3.0)
    ema.update(lin)  # d = min(0.9, 1/10) = 0.1: shadow = 0.1 * 1 + 0.9 * 3
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), 2.8))
    with ema.applied(lin):
        assert torch.equal(lin.weight, torch.full((1, 2), 2.8))
    assert torch.equal(lin.weight, torch.full((1, 2), 3.0))


# ---- exact resume ----------------------------------------------------------------------------------------------------

def _cli_cmd(out: Path, *extra: str) -> list:
    sets = ["model." + k + "=" + json.dumps(v) for k, v in MICRO.items()] + [
        "image_size=16", "steps=6", "batch_size=8", "grad_accum=2", "warmup_steps=2", "log_every=1", "ckpt_every=1",
        "keep_last=2", "eval_n=8", "captions=false", "disc_start=2", "disc_ndf=8", "disc_layers=2"]
    return [sys.executable, "-m", "fastvq", "train", "tokenizer", "--preset", "vqgan-tiny", "--out", str(out),
            *[a for s in sets for a in ("--set", s)], *extra]


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    """An uninterrupted run against one killed by SIGKILL right after its third checkpoint and resumed with
    --resume: the final weights, EMA and optimizer states are bit for bit the same, and so is the loss log."""
    env = dict(os.environ, PYTHONPATH=str(REPO), FASTVQ_PROGRESS="0", OMP_NUM_THREADS="1")
    kill_env = dict(env, FASTVQ_TEST_SIGKILL_AFTER="3")
    ref = tmp_path / "ref"
    Trainer(micro_config(tmp_path, out=str(ref), ckpt_every=1, keep_last=2), progress=False).train()

    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli_cmd(run), env=kill_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:  # the run kills itself right after publishing checkpoint 3 (no race with a watcher)
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == -signal.SIGKILL, out.decode()[-3000:]
    assert resolve_checkpoint(run).name == "step-000003"  # latest names the verified checkpoint 3

    done = subprocess.run(_cli_cmd(run, "--resume"), env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    final = resolve_checkpoint(run)
    assert final.name == "step-000006"
    assert_bit_identical(weights(final), weights(ref / "checkpoints" / "step-000006"))
    assert losses(run) == losses(ref)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000005", "step-000006"]


def test_unitok_resume_in_process_is_bit_identical(tmp_path):
    """The same property on UniTok (multi-codebook, learnable codebooks, attention projections), resumed in the
    same process, with bf16 autocast and a weight decay."""
    kw = dict(preset="unitok-tiny", model={"perceptual_weight": 0.0}, image_size=32, steps=3, batch_size=4,
              grad_accum=1, ckpt_every=2, gan_weight=0.0, precision="bf16")
    ref = Trainer(micro_config(tmp_path, out=str(tmp_path / "a"), **kw), progress=False)
    ref.train()
    Trainer(micro_config(tmp_path, out=str(tmp_path / "b"), **dict(kw, steps=2)), progress=False).train()
    Trainer(micro_config(tmp_path, out=str(tmp_path / "b"), **kw), resume="auto", progress=False).train()
    assert_bit_identical(weights(tmp_path / "a/checkpoints/step-000003"),
                         weights(tmp_path / "b/checkpoints/step-000003"))


# ---- accumulation, codebook and EMA steps ----------------------------------------------------------------------------

def test_grad_accum_equals_the_full_batch_and_updates_once_per_step(tmp_path):
    """4 micro-batches of 2 against one batch of 8: the same loss curve (fp32 summation order apart), codebook and
    EMA steps once per optimizer step. Dead-code replacement is off here: it picks vectors by a hash of their
    float bits, so a last-bit difference picks another vector (the choice does not depend on the split itself)."""
    runs = {}
    for accum in (1, 4):
        t = Trainer(micro_config(tmp_path, model=dict(MICRO, dead_code_threshold=0.0),
                                 out=str(tmp_path / f"acc{accum}"), grad_accum=accum, steps=3, gan_weight=0.0,
                                 ckpt_every=0), progress=False)
        t.train()
        runs[accum] = t
        vq = t.model.quantizer
        assert vq.manual_ema_update and int(vq.update_steps) == 3  # once per optimizer step, not per micro-batch
        assert t.ema.updates == 3
        assert int(vq.usage_counts.sum()) == 3 * 8 * 8 * 8  # 3 steps x 8 images x 8 x 8 tokens
    la, lb = losses(tmp_path / "acc1"), losses(tmp_path / "acc4")
    assert [s for s, _ in la] == [s for s, _ in lb] == [1, 2, 3]
    for (_, x), (_, y) in zip(la, lb):
        assert y == pytest.approx(x, rel=1e-5)
    # Adam divides by sqrt(v): an element whose gradient is ~0 moves by up to lr on a rounding difference, so a
    # few elements differ by one step; all others agree to 1e-5
    a, b = runs[1].model.state_dict(), runs[4].model.state_dict()
    diff = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a if a[k].is_floating_point()])
    assert (diff > 1e-5).float().mean() < 0.01 and diff.max() < 2e-3


# ---- non-finite losses -----------------------------------------------------------------------------------------------

def test_nan_steps_are_skipped_counted_and_limited(tmp_path):
    t = Trainer(micro_config(tmp_path, steps=4, ckpt_every=1, gan_weight=0.0, max_nan_steps=1), progress=False)
    real_forward = t.forward
    poisoned = {2, 3}

    def forward(images, texts=None):
        rec, out = real_forward(images, texts)
        if t.step in poisoned:
            out = dict(out, loss=out["loss"] * float("nan"))
        return rec, out

    t.forward = forward
    snapshot = {}
    real_skip = t._skip_step

    def skip():
        snapshot[t.step] = {k: v.clone() for k, v in t.model.state_dict().items()}
        real_skip()

    t._skip_step = skip
    with pytest.raises(TrainingError, match=r"2 steps had a non-finite loss \(max_nan_steps=1\); stopped at step 3"
                                            r".*step-000003.*is intact"):
        t.train()
    # the skipped step changed nothing: weights and codebook statistics as after step 2's checkpoint
    saved = load_file(str(tmp_path / "run/checkpoints/step-000002/model.safetensors"))
    for k, v in saved.items():
        assert torch.equal(t.model.state_dict()[k], v), k
    assert int(t.model.quantizer.acc_usage.sum()) == 0 and t.nan_steps == 2
    logged = [r for r in map(json.loads, (tmp_path / "run/metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2] and all(math.isfinite(r["loss"]) for r in logged)
    assert resolve_checkpoint(tmp_path / "run").name == "step-000003"
    assert json.loads((tmp_path / "run/checkpoints/step-000003/state.json").read_text())["nan_steps"] == 1


# ---- checkpoints: atomic writes, full disk, corruption, mismatches ---------------------------------------------------

def test_full_disk_keeps_the_previous_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    write_checkpoint(root, 1, {"a.json": lambda p: p.write_text("{}")}, keep_last=2)

    def full(p):
        p.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step-000002 \(No space left on device\);"
                                              r" the latest complete checkpoint is still 'step-000001'"):
        write_checkpoint(root, 2, {"a.json": lambda p: p.write_text("{}"), "b.bin": full}, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001"]  # no partial directory left
    assert resolve_checkpoint(root).name == "step-000001"
    for s in (2, 3, 4):
        write_checkpoint(root, s, {"a.json": lambda p: p.write_text("{}")}, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000003", "step-000004"]


def test_a_crash_mid_write_leaves_latest_on_the_previous_checkpoint(tmp_path):
    """A process that dies inside write_checkpoint (here: an exception other than OSError, after one file) leaves
    its temporary directory behind and `latest` untouched; the next run's clean_partial removes the leftover."""
    from fastvq.train.checkpoint import clean_partial
    root = tmp_path / "ckpt"
    write_checkpoint(root, 1, {"a.json": lambda p: p.write_text('{"step": 1}')}, keep_last=3)

    def die(p):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(root, 2, {"a.json": lambda p: p.write_text('{"step": 2}'), "b.json": die}, keep_last=3)
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == [f".tmp-step-000002-{os.getpid()}"]
    assert (root / "latest").read_text() == "step-000001\n" and resolve_checkpoint(root).name == "step-000001"
    clean_partial(root)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001"]


def test_corrupt_missing_and_mismatched_checkpoints(tmp_path):
    cfg = micro_config(tmp_path, steps=2, ckpt_every=1, gan_weight=0.0)
    Trainer(cfg, progress=False).train()
    ckpts = tmp_path / "run/checkpoints"
    data = bytearray((ckpts / "step-000002/optim.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (ckpts / "step-000002/optim.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"step-000002 is corrupt: optim.safetensors does not match its sha256"
                                              r".*Older checkpoints to resume from instead: \[.*step-000001'\]"):
        Trainer(micro_config(tmp_path, steps=4, gan_weight=0.0), resume="auto", progress=False)
    assert cli(["train", "tokenizer", "--preset", "vqgan-tiny", "--resume", str(tmp_path / "nowhere")]) == 2
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")
    with pytest.raises(TrainingError, match=r"another configuration: lr: 0.001 -> 0.002"):
        Trainer(micro_config(tmp_path, steps=4, gan_weight=0.0, lr=2e-3), resume=str(ckpts / "step-000001"),
                progress=False)
    with pytest.raises(TrainingError, match="already holds checkpoints; pass --resume"):
        Trainer(micro_config(tmp_path, steps=4, gan_weight=0.0), progress=False)


def test_a_fresh_start_keeps_the_log_of_a_run_that_never_checkpointed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 7, "loss": 1.0}\n')
    Trainer(micro_config(tmp_path, steps=1, gan_weight=0.0), progress=False).train()
    assert (run / "metrics.jsonl.previous").read_text() == '{"step": 7, "loss": 1.0}\n'
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [1, 1]


def test_unknown_preset_and_data_set_are_clear_errors(tmp_path, capsys):
    assert cli(["train", "tokenizer", "--preset", "unitok-huge", "--out", str(tmp_path / "x")]) == 2
    assert "fastvq: error: unknown preset 'unitok-huge'; known: [" in capsys.readouterr().err
    assert cli(["train", "tokenizer", "--preset", "vqgan-tiny", "--data", "imagenet", "--out", str(tmp_path)]) == 2
    assert "unknown data set 'imagenet'; known: ['fashion_mnist'" in capsys.readouterr().err
    assert cli(["train", "tokenizer", "--preset", "vqgan-tiny", "--set", "stage=2", "--out", str(tmp_path)]) == 2
    assert "stage=2 needs a model with set_stage(); VQGAN has a single stage" in capsys.readouterr().err


# ---- eval and reconstruct commands -----------------------------------------------------------------------------------

def test_eval_and_reconstruct_commands(tmp_path, capsys):
    from PIL import Image
    Trainer(micro_config(tmp_path, steps=2, ckpt_every=0, gan_weight=0.0), progress=False).train()
    run = tmp_path / "run"
    assert (run / "eval/step-000002-recon.png").is_file() and (run / "eval/loss_curve.png").is_file()
    in_loop = json.loads((run / "eval/step-000002.json").read_text())
    out = tmp_path / "metrics.json"
    assert cli(["eval", "tokenizer", str(run), "--n", "8", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    got = json.loads(out.read_text())
    assert "psnr" in table and got["psnr"] == pytest.approx(in_loop["psnr"], abs=0)  # EMA weights, same 8 images
    assert got["ssim"] == in_loop["ssim"] and 0 < got["usage"] <= 1 and got["n"] == 8
    Image.fromarray((torch.rand(20, 24, 3) * 255).byte().numpy()).save(tmp_path / "in.png")
    assert cli(["reconstruct", str(run), str(tmp_path / "in.png"), str(tmp_path / "out.png")]) == 0
    assert Image.open(tmp_path / "out.png").size == (16, 16)


def test_text_tower_metrics_through_embed_images(tmp_path):
    """UniTok's evaluation hook: embed_images is the CLIP head on the post-quantization tokens, and a model with a
    text tower gets zero-shot and retrieval numbers (a byte-embedding stand-in tower: values, not quality)."""
    from test_models_unitok import FakeTextTower

    from fastvq.models import from_preset
    from fastvq.train.evaluate import evaluate_model
    model = from_preset("unitok-tiny", image_size=32, perceptual_weight=0.0).eval()
    model.set_text_encoder(FakeTextTower())
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out = model.encode(x)
        want = model.image_features(model.post_quant_proj(out.quantized))
        torch.testing.assert_close(model.embed_images(x), want)
        m = evaluate_model(model, "fashion_mnist", 12, 0, 32)
    zs, rt = m["details"]["zero_shot"], m["details"]["retrieval"]
    assert zs["n"] == 12 and zs["settings"]["num_classes"] == 10 and 0 <= m["zero_shot_top1"] <= 1
    assert m["zero_shot_top1"] == zs["details"]["top1"]
    assert rt["settings"]["n_texts"] == 12 and m["retrieval"] == pytest.approx(
        sum(rt["details"][k] for k in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5")) / 4)
    assert m["usage"] * 256 * 4 == pytest.approx(sum(round(u * 256) for u in m["details"]["usage"]["details"]["usage"]))


def test_compile_flag_trains_the_same(tmp_path):
    """--compile: torch.compile of the model (aot_eager here: AOTAutograd traces forward and backward without
    inductor's minute of code generation on 2 cores) gives the eager loss curve."""
    curves = []
    for compiled in (False, True):
        out = tmp_path / f"c{int(compiled)}"
        Trainer(micro_config(tmp_path, out=str(out), steps=2, ckpt_every=0, gan_weight=0.0, compile=compiled,
                             compile_backend="aot_eager"), progress=False).train()
        curves.append(losses(out))
    assert [s for s, _ in curves[1]] == [1, 2]
    for (_, a), (_, b) in zip(*curves):
        assert b == pytest.approx(a, rel=1e-5)


class StagedVQGAN(VQGAN):
    """A two-stage model for the trainer's stage hook (VQRAE's shape): stage 1 freezes the encoder."""

    model_name = "vqgan-staged-test"

    def set_stage(self, stage: int) -> None:
        self.encoder.requires_grad_(stage != 1)


register_preset("vqgan-staged-test", StagedVQGAN, VQGANConfig(**{**MICRO, "channel_mult": (1, 2)}))


def test_stages_and_init_from(tmp_path):
    """stage=1 trains with the encoder frozen (the optimizer holds only trainable parameters); stage 2 starts from
    stage 1's EMA weights (init_from) and trains everything."""
    from fastvq.models import from_preset
    kw = dict(preset="vqgan-staged-test", model={}, steps=2, ckpt_every=0, gan_weight=0.0)
    torch.manual_seed(0)
    init = from_preset("vqgan-staged-test").state_dict()
    s1 = Trainer(micro_config(tmp_path, out=str(tmp_path / "s1"), stage=1, **kw), progress=False)
    s1.train()
    after1 = s1.model.state_dict()
    assert all(torch.equal(after1[k], init[k]) for k in init if k.startswith("encoder."))
    assert not torch.equal(after1["decoder.conv_out.weight"], init["decoder.conv_out.weight"])
    s2 = Trainer(micro_config(tmp_path, out=str(tmp_path / "s2"), stage=2, init_from=str(tmp_path / "s1"), **kw),
                 progress=False)
    ema1 = load_file(str(tmp_path / "s1/checkpoints/step-000002/ema.safetensors"))
    assert all(torch.equal(s2.model.state_dict()[k], v) for k, v in ema1.items())
    s2.train()
    assert not torch.equal(s2.model.state_dict()["encoder.conv_in.weight"], ema1["encoder.conv_in.weight"])
