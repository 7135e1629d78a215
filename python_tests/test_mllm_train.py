"""fastvq.train.mllm and fastvq.eval.mllm: the MLLM trainer (task mix, code cache, exact resume after SIGKILL, DDP and
FSDP on 2 gloo ranks against one process), the generate / caption / eval mllm commands and their errors, and the
evaluation functions with their baselines. A random 32-px UniTok (2 x 2 positions of 4 sub-codes) and a micro MLLM
(one 32-wide layer) on a few hundred Fashion-MNIST items keep every step to milliseconds."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddp import run_ddp
from fastvq.cli import main as cli
from fastvq.train import CheckpointError, resolve_checkpoint
from fastvq.train.mllm import (MLLMTrainConfig, MLLMTrainer, TaskStream, encode_split, load_mllm, task_counts,
                               tokenizer_fingerprint, untrained_like)

REPO = Path(__file__).resolve().parents[1]
MICRO = {"dim": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "depth_layers": 1, "code_dim": 8,
         "proj_heads": 2, "max_text_len": 12}
# DDP / FSDP against one process: the gradients differ by fp32 summation order only (two half-batch sums against
# one), and so do the next steps' losses.
LOSS_RTOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    assert torch.is_grad_enabled(), "a command left autograd disabled in the process"


def make_tokenizer(path: Path, seed: int = 0, **overrides) -> Path:
    from fastvq.models import from_preset
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok = from_preset("unitok-tiny", **{"image_size": 32, "perceptual_weight": 0.0, **overrides})
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "unitok")


def micro_config(tokenizer: Path, out: Path, **kw) -> MLLMTrainConfig:
    base = dict(tokenizer=str(tokenizer), model=dict(MICRO), data="fashion_mnist", train_n=256, steps=4, batch_size=8,
                grad_accum=2, warmup_steps=2, log_every=1, ckpt_every=2, eval_n=4, ema_decay=0.9, out=str(out))
    base.update(kw)
    return MLLMTrainConfig(**base)


def losses(run: Path) -> list:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def state(ckpt: Path) -> dict:
    out = {}
    for name in ("model.safetensors", "ema.safetensors", "optim.safetensors"):
        out.update({f"{name}:{k}": v for k, v in load_file(str(ckpt / name)).items()})
    return out


def assert_bit_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def trained_run(tokenizer_dir, tmp_path_factory) -> Path:
    """A micro MLLM trained 6 steps (the CLI and eval tests read it)."""
    out = tmp_path_factory.mktemp("mllm") / "run"
    MLLMTrainer(micro_config(tokenizer_dir, out, steps=6, ckpt_every=0, grad_accum=1), progress=False).train()
    return out


# ---- the task mix --------------------------------------------------------------------------------------------------

def test_task_counts_follow_the_weights():
    w = {"t2i": 0.5, "caption": 0.25, "qa": 0.25}
    assert task_counts(16, w) == {"t2i": 8, "caption": 4, "qa": 4}
    assert task_counts(5, w) == {"t2i": 3, "caption": 1, "qa": 1}      # largest remainder, TASKS order on ties
    assert task_counts(8, {"t2i": 0.9, "caption": 0.05, "qa": 0.05}) == {"t2i": 6, "caption": 1, "qa": 1}
    assert task_counts(4, {"t2i": 1.0, "caption": 0.0, "qa": 0.0}) == {"t2i": 4}
    with pytest.raises(ValueError, match="task weights must be >= 0 with a positive sum"):
        MLLMTrainConfig(tokenizer="x", t2i_weight=0, caption_weight=0, qa_weight=0).validate()


def test_task_stream_is_a_function_of_the_micro_batch_and_shards_over_ranks():
    codes = torch.arange(40 * 4).view(40, 4, 1) % 256
    texts = [f"item {i}" for i in range(40)]
    pools = {t: (codes, texts) for t in ("t2i", "caption", "qa")}
    counts = {"t2i": 4, "caption": 2, "qa": 2}
    one = TaskStream(pools, counts, seed=3, rank=0, world=1, cfg_dropout=0.5)
    ranks = [TaskStream(pools, counts, seed=3, rank=r, world=2, cfg_dropout=0.5) for r in (0, 1)]
    seen = []
    for m in (0, 1, 7, 25, 3):  # out of order: a pure function of m (per-task epochs: 10, 20, 20 micro-batches)
        a = one.get(m)
        b = [s.get(m) for s in ranks]
        for t in counts:
            assert a[t]["texts"] == b[0][t]["texts"] + b[1][t]["texts"]
            assert torch.equal(a[t]["codes"], torch.cat([b[0][t]["codes"], b[1][t]["codes"]]))
        assert torch.equal(a["t2i"]["drop"], torch.cat([b[0]["t2i"]["drop"], b[1]["t2i"]["drop"]]))
        seen.append(a["t2i"]["drop"])
    assert any(d.any() for d in seen) and not all(d.all() for d in seen)  # p = 0.5 both ways
    epoch0 = [one.get(m)["t2i"]["texts"] for m in range(10)]
    assert sorted(t for b in epoch0 for t in b) == sorted(texts)  # an epoch reads every item once
    with pytest.raises(ValueError, match="2 caption items per micro-batch .* must be a multiple of the 4 processes"):
        TaskStream(pools, counts, seed=0, rank=0, world=4)


# ---- the code cache ---------------------------------------------------------------------------------------------------

def test_code_cache_is_reused_and_invalidated_when_the_tokenizer_changes(tmp_path, monkeypatch, tokenizer_dir):
    import fastvq.train.mllm as tm
    from fastvq.models import from_pretrained
    from fastvq.models.mllm import VisualCodec
    monkeypatch.setattr(tm, "_cache_root", lambda: tmp_path / "codes")
    tok = from_pretrained(tokenizer_dir).eval()
    codec = VisualCodec.from_tokenizer(tok)
    first = encode_split(tok, codec, "fashion_mnist", "train", 32, verbose=False)
    assert not first["cached"] and first["codes"].shape == (32, 4, 4) and first["codes"].dtype == torch.int64
    with np.load(first["cache"], allow_pickle=False) as z:  # plain arrays only
        assert z["codes"].dtype == np.int32 and str(z["key"]).startswith("{")
    again = encode_split(tok, codec, "fashion_mnist", "train", 32, verbose=False)
    assert again["cached"] and again["cache"] == first["cache"] and torch.equal(again["codes"], first["codes"])
    # the codes are what the tokenizer gives for those images, in that order
    from fastvq.data import load_dataset
    ds = load_dataset("fashion_mnist", "train", image_size=32)
    with torch.no_grad():
        want = codec.encode(tok, ds.images(first["positions"][:5]) * 2 - 1)
    assert torch.equal(first["codes"][:5], want)
    # one changed weight: another fingerprint, another file, new codes
    fp = tokenizer_fingerprint(tok)
    with torch.no_grad():
        next(tok.parameters()).add_(0.5)
    assert tokenizer_fingerprint(tok) != fp
    changed = encode_split(tok, codec, "fashion_mnist", "train", 32, verbose=False)
    assert not changed["cached"] and changed["cache"] != first["cache"]
    assert len(list((tmp_path / "codes").iterdir())) == 2
    # a corrupt file is rebuilt, with a warning naming it
    changed["cache"].write_bytes(b"not a zip")
    with pytest.warns(RuntimeWarning, match="encode_split: cache file .* is corrupt"):
        rebuilt = encode_split(tok, codec, "fashion_mnist", "train", 32, verbose=False)
    assert not rebuilt["cached"] and torch.equal(rebuilt["codes"], changed["codes"])


# ---- exact resume --------------------------------------------------------------------------------------------------

def _cli_cmd(tokenizer: Path, out: Path, *extra: str) -> list:
    sets = [f"model.{k}={json.dumps(v)}" for k, v in MICRO.items()] + [
        "train_n=256", "steps=6", "batch_size=8", "grad_accum=2", "warmup_steps=2", "log_every=1", "ckpt_every=1",
        "keep_last=2", "eval_n=4", "ema_decay=0.9"]
    return [sys.executable, "-m", "fastvq", "train", "mllm", "--tokenizer", str(tokenizer), "--data", "fashion_mnist",
            "--out", str(out), *[a for s in sets for a in ("--set", s)], *extra]


def test_sigkill_then_resume_is_bit_identical(tmp_path, tokenizer_dir):
    """An uninterrupted run against `fastvq train mllm` killed by SIGKILL right after its third checkpoint and
    resumed with --resume: weights, EMA, AdamW state and the loss log are bit for bit the same (CFG prompt dropout
    on, gradient accumulation 2, all three tasks)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), FASTVQ_PROGRESS="0", OMP_NUM_THREADS="1")
    kill_env = dict(env, FASTVQ_TEST_SIGKILL_AFTER="3")
    ref = tmp_path / "ref"
    MLLMTrainer(micro_config(tokenizer_dir, ref, steps=6, ckpt_every=1, keep_last=2), progress=False).train()
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli_cmd(tokenizer_dir, run), env=kill_env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:  # the run kills itself right after publishing checkpoint 3 (no race with a watcher)
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == -signal.SIGKILL, out.decode()[-3000:]
    assert resolve_checkpoint(run).name == "step-000003"  # latest names the verified checkpoint 3
    done = subprocess.run(_cli_cmd(tokenizer_dir, run, "--resume"), env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    final = resolve_checkpoint(run)
    assert final.name == "step-000006"
    assert_bit_identical(state(final), state(ref / "checkpoints/step-000006"))
    assert losses(run) == losses(ref)
    # the checkpoint is self-contained: the MLLM, its text vocabulary and the tokenizer the codes came from
    names = json.loads((final / "manifest.json").read_text())["files"]
    assert {"config.json", "model.safetensors", "text_vocab.json", "tokenizer/config.json",
            "tokenizer/model.safetensors", "state.json", "rng.safetensors"} <= set(names)
    tok_weights = load_file(str(final / "tokenizer/model.safetensors"))
    assert_bit_identical(tok_weights, load_file(str(tokenizer_dir / "model.safetensors")))


def test_bf16_and_resume_in_process_is_bit_identical(tmp_path, tokenizer_dir):
    """precision=bf16 (autocast) trains with finite losses, and a run resumed in the same process from its step-2
    checkpoint ends bit-identical to the uninterrupted one."""
    kw = dict(precision="bf16", steps=3, grad_accum=1, ckpt_every=2)
    MLLMTrainer(micro_config(tokenizer_dir, tmp_path / "a", **kw), progress=False).train()
    MLLMTrainer(micro_config(tokenizer_dir, tmp_path / "b", **dict(kw, steps=2)), progress=False).train()
    MLLMTrainer(micro_config(tokenizer_dir, tmp_path / "b", **kw), resume="auto", progress=False).train()
    assert_bit_identical(state(tmp_path / "a/checkpoints/step-000003"), state(tmp_path / "b/checkpoints/step-000003"))
    curve = losses(tmp_path / "a")
    assert curve == losses(tmp_path / "b") and all(np.isfinite(v) for _, v in curve)


@pytest.mark.parametrize("preset", ["mergevq-tiny", "uniwetok-tiny"])
def test_binary_code_tokenizers_train_and_generate(tmp_path, preset):
    """The trainer is tokenizer-agnostic: MergeVQ's factorised LFQ codes (6 + 12 bits over the full 8 x 8 grid)
    and UniWeTok's 16 groups of 8 bits ("bits" adapter and group heads) train a step, checkpoint, load and
    generate an image of the tokenizer's size."""
    from fastvq.eval.mllm import generate_images
    from fastvq.models import from_preset
    torch.manual_seed(0)
    from_preset(preset).save_pretrained(tmp_path / "tok")
    t = MLLMTrainer(micro_config(tmp_path / "tok", tmp_path / "run", steps=1, train_n=32, grad_accum=1,
                                 ckpt_every=0, eval_n=2), progress=False)
    t.train()
    assert t.codec.kind == "bits" and t.model.config.adapter == "bits"
    mllm, tok = load_mllm(tmp_path / "run")
    x = generate_images(mllm, tok, ["A photo of a bag."], 3.0, 0)
    size = tok.config.image_size
    assert x.shape == (1, 3, size, size) and 0 <= float(x.min()) and float(x.max()) <= 1


def test_resume_refuses_another_configuration(tmp_path, tokenizer_dir):
    from fastvq.train import TrainingError
    MLLMTrainer(micro_config(tokenizer_dir, tmp_path / "run", steps=2, ckpt_every=0), progress=False).train()
    with pytest.raises(TrainingError, match=r"another configuration: qa_weight: 0.25 -> 0.5"):
        MLLMTrainer(micro_config(tokenizer_dir, tmp_path / "run", steps=4, qa_weight=0.5), resume="auto",
                    progress=False)
    with pytest.raises(TrainingError, match="already holds checkpoints; pass --resume"):
        MLLMTrainer(micro_config(tokenizer_dir, tmp_path / "run", steps=4), progress=False)


# ---- DDP and FSDP on 2 gloo ranks ----------------------------------------------------------------------------------

def test_ddp_and_fsdp_on_two_ranks_match_one_process(tmp_path, tokenizer_dir):
    """2 gloo ranks (one torchrun) train the same run twice, with DDP and with FSDP2 (fully_shard of every block's
    attention and SwiGLU and the model), against one process with the same global batch: gradient accumulation
    2, EMA, all three tasks, so captions and answers of different lengths on the two ranks (the step's token mean
    must be the global one). Each time: the loss curve of one process to a relative 1e-5, both ranks'
    weights bit-identical and equal to the one process's to 1e-4, rank 0 alone wrote the log and the
    checkpoints, and the checkpoint holds the full (gathered) weights, EMA and AdamW state. And an FSDP run
    resumed from its step-2 checkpoint is bit-identical to the uninterrupted one."""
    kw = dict(batch_size=16)  # 8 items a micro-batch: 4 / 2 / 2 per task, halved on each rank
    cfgs = {m: micro_config(tokenizer_dir, tmp_path / m, fsdp=m == "fsdp", **kw).to_dict() for m in ("ddp", "fsdp")}
    script = f"""
    import torch
    torch.set_num_threads(1)
    from fastvq.train.mllm import MLLMTrainConfig, MLLMTrainer
    out = {{}}
    for mode, cfg in {cfgs!r}.items():
        t = MLLMTrainer(MLLMTrainConfig.from_dict(cfg), progress=False)
        t.train()
        out.update({{mode + ":" + k: v.full_tensor() if hasattr(v, "full_tensor") else v
                     for k, v in t.model.state_dict().items()}})
    # FSDP resume: 2 steps, then resumed to 4 from the gathered checkpoint
    cfg = dict({cfgs["fsdp"]!r}, out={str(tmp_path / "fsdp-resumed")!r})
    MLLMTrainer(MLLMTrainConfig.from_dict(dict(cfg, steps=2)), progress=False).train()
    MLLMTrainer(MLLMTrainConfig.from_dict(cfg), resume="auto", progress=False).train()
    save_rank(out)
    """
    ranks = run_ddp(script, tmp_path, nproc=2)
    one = MLLMTrainer(micro_config(tokenizer_dir, tmp_path / "one", **kw), progress=False)
    one.train()
    mine = one.model.state_dict()
    assert ranks[0].keys() == ranks[1].keys() == {f"{m}:{k}" for m in ("ddp", "fsdp") for k in mine}
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    for mode in ("ddp", "fsdp"):
        a, b = losses(tmp_path / mode), losses(tmp_path / "one")
        assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
        for (_, x), (_, y) in zip(a, b):
            assert x == pytest.approx(y, rel=LOSS_RTOL), mode
        for k, v in mine.items():
            torch.testing.assert_close(ranks[0][f"{mode}:{k}"], v, rtol=1e-4, atol=1e-5)
        ckpt = tmp_path / mode / "checkpoints/step-000004"
        state_json = json.loads((ckpt / "state.json").read_text())
        assert state_json["world_size"] == 2 and len(state_json["rng"]) == 2 and state_json["fsdp"] == (mode == "fsdp")
        mllm, _ = load_mllm(tmp_path / mode, ema=False)  # the full weights, loadable without a process group
        for k, v in mllm.state_dict().items():
            assert torch.equal(v, ranks[0][f"{mode}:{k}"]), (mode, k)
        assert load_file(str(ckpt / "ema.safetensors")).keys() == mine.keys()
        assert any(k.endswith(".exp_avg_sq") for k in load_file(str(ckpt / "optim.safetensors")))
    # an FSDP run resumed from its step-2 checkpoint ends bit-identical to the uninterrupted FSDP run
    assert_bit_identical(state(tmp_path / "fsdp-resumed/checkpoints/step-000004"),
                         state(tmp_path / "fsdp/checkpoints/step-000004"))
    assert losses(tmp_path / "fsdp-resumed") == losses(tmp_path / "fsdp")


# ---- generate, caption and their errors ----------------------------------------------------------------------------

def test_generate_and_caption_commands(tmp_path, trained_run, capsys):
    from PIL import Image
    out = tmp_path / "bag.png"
    assert cli(["generate", str(trained_run), "A photo of a bag.", "--out", str(out), "--num", "3", "--seed", "1",
                "--cfg", "2", "--top-k", "50", "--top-p", "0.9"]) == 0
    assert "-> 3 image(s) of 32x32" in capsys.readouterr().out
    assert Image.open(out).size == (3 * 34, 34)  # a grid: 3 columns of 32 px + 2-px gaps
    assert cli(["generate", str(trained_run), "A photo of a bag.", "--out", str(tmp_path / "one.png")]) == 0
    assert Image.open(tmp_path / "one.png").size == (66, 66)  # one image, pixels doubled, 1-px border
    # the same seed gives the same image; another seed another
    assert cli(["generate", str(trained_run), "A photo of a bag.", "--out", str(tmp_path / "b.png"), "--num", "3",
                "--seed", "1", "--cfg", "2", "--top-k", "50", "--top-p", "0.9"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "b.png")))
    capsys.readouterr()
    Image.fromarray((np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    assert cli(["caption", str(trained_run), str(tmp_path / "in.png")]) == 0
    caption = capsys.readouterr().out.strip()
    assert isinstance(caption, str)
    assert cli(["caption", str(trained_run), str(tmp_path / "in.png"), "--question", "what is this?"]) == 0
    capsys.readouterr()


def test_generate_and_caption_errors(tmp_path, trained_run, capsys, tokenizer_dir):
    from PIL import Image
    cases = [
        (["generate", str(tmp_path / "nowhere"), "a bag"], "nowhere does not exist"),
        (["generate", str(trained_run), "   "], "fastvq generate: the prompt is empty"),
        (["generate", str(trained_run), "a bag " * 40], "more than max_text_len 12"),
        (["generate", str(trained_run), "a bag", "--top-p", "1.5"], "top_p"),
        (["caption", str(trained_run), str(tmp_path / "missing.png")], "image .*missing.png does not exist"),
        (["caption", str(trained_run), str(tmp_path / "notes.txt")], "cannot read .*notes.txt as an image"),
        (["caption", str(trained_run), str(tmp_path / "in.png"), "--question", ""], "--question is empty"),
        (["train", "mllm", "--data", "fashion_mnist", "--out", str(tmp_path / "x")], "--tokenizer CKPT is required"),
        (["train", "mllm", "--tokenizer", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")],
         "tokenizer checkpoint .*nowhere does not exist"),
        (["train", "mllm", "--tokenizer", str(tokenizer_dir), "--preset", "mllm-huge"], "unknown MLLM preset"),
    ]
    (tmp_path / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    for argv, message in cases:
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("fastvq: error: "), err
        assert __import__("re").search(message, err), (message, err)
    # a corrupt checkpoint: the manifest names the file
    bad = tmp_path / "bad"
    import shutil
    shutil.copytree(resolve_checkpoint(trained_run), bad)
    (bad / "tokenizer/model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="tokenizer/model.safetensors does not match its sha256"):
        load_mllm(bad)


def test_a_tokenizer_that_does_not_match_the_mllm(tmp_path, trained_run, capsys):
    """An MLLM save_pretrained directory whose tokenizer/ holds another tokenizer (other codebooks): a clear
    error, from the command and from load_mllm."""
    mllm, _ = load_mllm(trained_run)
    mllm.save_pretrained(tmp_path / "m")
    make_tokenizer(tmp_path / "m/tokenizer", codebook_size=128)
    assert cli(["generate", str(tmp_path / "m"), "a bag", "--out", str(tmp_path / "x.png")]) == 2
    assert "check_tokenizer: the tokenizer does not match" in capsys.readouterr().err
    (tmp_path / "n").mkdir()
    mllm.save_pretrained(tmp_path / "n")
    with pytest.raises(FileNotFoundError, match="has no tokenizer/ directory"):
        load_mllm(tmp_path / "n")


# ---- evaluation ---------------------------------------------------------------------------------------------------

def _random_classifier():
    from fastvq.eval.classifier import TRAIN_SETTINGS, FashionMNISTNet
    torch.manual_seed(0)
    return FashionMNISTNet().eval(), dict(TRAIN_SETTINGS, test_accuracy=0.0)


def test_eval_functions_and_baselines(tmp_path, trained_run):
    from fastvq.data import load_dataset
    from fastvq.eval.mllm import evaluate_mllm, most_frequent
    mllm, tok = load_mllm(trained_run)
    clf = _random_classifier()
    train = load_dataset("fashion_mnist", "train")
    rows = {}
    for tag, model in (("trained", mllm), ("untrained", untrained_like(mllm, 0))):
        rows[tag] = evaluate_mllm(model, tok, tmp_path / "eval", tag, caption_sets=("fashion_mnist",), caption_n=8,
                                  qa_n=20, per_class=2, kid_real_n=0, cfg_scales=(1.0, 3.0), classifier=clf,
                                  train_labels=train.labels[:500],
                                  train_captions={"fashion_mnist": train.captions[:500]})
    r = rows["trained"]
    for key in ("caption_fashion_mnist_bleu4", "caption_fashion_mnist_cider", "qa_accuracy", "t2i_accuracy",
                "caption_fashion_mnist_bleu4_most_frequent", "caption_fashion_mnist_bleu4_blank_image",
                "qa_accuracy_majority", "qa_accuracy_blank_image", "t2i_accuracy_unconditional",
                "t2i_accuracy_reconstruction"):
        assert 0.0 <= r[key] <= (1.0 if "cider" not in key else 10.0), key
    # the baselines, computed independently
    val = load_dataset("fashion_mnist", "val")
    pos = np.arange(len(val)) if False else np.random.default_rng(0).permutation(len(val))[:20]
    major = np.bincount(train.labels[:500], minlength=10).argmax()
    assert r["qa_accuracy_majority"] == pytest.approx(np.mean(val.labels[pos] == major))
    assert r["details"]["caption_fashion_mnist_most_frequent"]["caption"] == most_frequent(train.captions[:500])
    assert [row["cfg_scale"] for row in r["cfg_sweep"]] == [1.0, 3.0] and r["cfg_sweep"][0]["n"] == 20
    assert r["details"]["t2i"]["n"] == 20 and r["details"]["t2i"]["settings"]["classifier_test_accuracy"] == 0.0
    assert rows["untrained"]["qa_accuracy"] <= 1.0
    for tag in ("trained", "untrained"):
        assert (tmp_path / f"eval/{tag}-t2i.png").is_file() and (tmp_path / f"eval/{tag}-cfg.png").is_file()
        assert json.loads((tmp_path / f"eval/{tag}.json").read_text())["qa_accuracy"] == rows[tag]["qa_accuracy"]
    # greedy text is deterministic: the same numbers again
    again = evaluate_mllm(mllm, tok, None, caption_sets=("fashion_mnist",), caption_n=8, qa_n=20, per_class=2,
                          kid_real_n=0, cfg_scales=(), baselines=False, classifier=clf)
    assert again["qa_accuracy"] == r["qa_accuracy"] and again["t2i_accuracy"] == r["t2i_accuracy"]
    assert again["caption_fashion_mnist_cider"] == r["caption_fashion_mnist_cider"]


def test_qa_accuracy_counts_exact_answers():
    """qa_eval against a stub model whose answers are known: accuracy is the fraction of exact class names after
    the text round trip ("T-shirt/top" -> "t - shirt / top")."""
    from fastvq.eval.mllm import qa_eval
    from fastvq.models.text import TextTokenizer
    names = ["T-shirt/top", "trouser", "bag"]
    tt = TextTokenizer.from_corpus(names + ["what is this?"])

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.text_tokenizer = tt
            self.config = __import__("types").SimpleNamespace(max_text_len=8)

        def generate_text(self, codes, question=None, max_new_tokens=8, temperature=0.0):
            return [tt.decode(tt.encode(names[int(c[0, 0])])) if int(c[1, 0]) else "bag" for c in codes]

    labels = np.array([0, 1, 2, 0])
    codes = torch.tensor([[[0], [1]], [[1], [1]], [[2], [0]], [[0], [0]]])  # the last one answers "bag" for class 0
    r = qa_eval(Stub(), codes, labels, names, "what is this?", "test")
    assert r["accuracy"].value == 0.75 and r["predictions"][0] == "t - shirt / top"


def test_eval_mllm_command(tmp_path, trained_run, capsys, monkeypatch):
    """`fastvq eval mllm`: a table with the trained and untrained columns and the baselines, and the JSON of both
    (the classifier replaced by a random one: the cached one would be trained on first use)."""
    import fastvq.eval.classifier as classifier
    monkeypatch.setattr(classifier, "fashion_mnist_classifier", _random_classifier)
    out = tmp_path / "e" / "eval.json"
    assert cli(["eval", "mllm", str(trained_run), "--kid-n", "0", "--per-class", "1", "--caption-n", "4",
                "--qa-n", "6", "--cfg-scales", "1,3", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "metric" in table and "trained  untrained" in table and "qa_accuracy_majority" in table
    assert "trained: cfg 3.0" in table and "untrained: cfg 1.0" in table
    got = json.loads(out.read_text())
    assert got["trained"]["details"]["qa"]["n"] == 6 and "qa_accuracy_majority" not in got["untrained"]
    assert (tmp_path / "e/eval-mllm-trained-t2i.png").is_file() and (tmp_path / "e/eval-mllm-untrained-cfg.png").is_file()
