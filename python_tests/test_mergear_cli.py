"""`fastvq train mergear` and `fastvq generate CKPT --keep K` (fastvq.models.mergear.MergeARTrainer; docs/mergear.md,
"Training and generating from the command line"): self-contained checkpoints, bit-identical resume, the commands'
errors."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastvq.cli import main as cli
from fastvq.models.mergear import (MergeAR, MergeARTrainConfig, MergeARTrainer, generate_images,
                                   is_mergear_checkpoint, resolve_mergear_checkpoint)
from fastvq.train import TrainingError

MICRO = ["model.dim=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1", "model.pointer_dim=16"]
MICRO_DICT = dict(dim=32, num_layers=1, num_heads=2, num_kv_heads=1, pointer_dim=16)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A random mergevq-tiny (32 px, 8x8 grid, keeps 25/36/49/64) as a save_pretrained directory."""
    from fastvq.models import from_preset
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tok = from_preset("mergevq-tiny")
    path = tmp_path_factory.mktemp("tok") / "mergevq"
    tok.save_pretrained(path)
    return path


def config(tok: Path, out: Path, **kw) -> MergeARTrainConfig:
    base = dict(tokenizer=str(tok), data="fashion_mnist:48", model=dict(MICRO_DICT), steps=6, batch_size=8,
                warmup=2, log_every=1, ckpt_every=2, keep_last=5, out=str(out))
    base.update(kw)
    return MergeARTrainConfig(**base)


@pytest.fixture(scope="module")
def cli_run(tokenizer_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "mergear"
    assert cli(["train", "mergear", "--tokenizer", str(tokenizer_dir), "--data", "fashion_mnist:48", "--steps", "3",
                "--out", str(run), "--set", "batch_size=8", "--set", "log_every=1", *sum((["--set", a] for a in MICRO),
                                                                                         [])]) == 0
    return run


def weights_and_optimizer(ckpt: Path) -> dict:
    out = {}
    for name in ("model.safetensors", "optim.safetensors", "rng.safetensors"):
        out.update({f"{name}:{k}": v for k, v in load_file(str(ckpt / name)).items()})
    return out


def test_cli_run_is_a_self_contained_mergear_checkpoint(cli_run, tokenizer_dir):
    ckpt = resolve_mergear_checkpoint(cli_run)
    assert ckpt.name == "step-000003"
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    for name in ("config.json", "model.safetensors", "tokenizer/config.json", "tokenizer/model.safetensors",
                 "train_config.json", "state.json", "optim.safetensors", "rng.safetensors"):
        assert name in files, name
    # the checkpoint's model is the tokenizer's: grid, keeps, fingerprint; the MICRO overrides took effect
    model = MergeAR.from_pretrained(ckpt)
    assert model.config.keep_candidates == (25, 36, 49, 64) and model.config.grid == (8, 8)
    assert model.config.dim == 32 and model.config.num_layers == 1
    from fastvq.models import from_pretrained
    model.check_tokenizer(from_pretrained(tokenizer_dir))
    assert is_mergear_checkpoint(cli_run) and is_mergear_checkpoint(ckpt) and is_mergear_checkpoint(ckpt.parent)
    assert not is_mergear_checkpoint(tokenizer_dir) and not is_mergear_checkpoint(cli_run / "nothing")
    log = [json.loads(line) for line in (cli_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss"] > 0 for r in log)


def test_generate_command_on_a_mergear_run(cli_run, tmp_path, capsys):
    from PIL import Image
    png = tmp_path / "trouser.png"
    assert cli(["generate", str(cli_run), "A photo of a trouser.", "--keep", "36", "--num", "3", "--cfg", "3",
                "--seed", "0", "--top-k", "50", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "keep 36 of 64 tokens" in out
    img = Image.open(png)
    assert img.size == (3 * 34, 34)                                    # 3 images of 32 px, 2-px gaps (scale 1)
    # the command's images are generate_images' (same seed, same settings)
    x, sample = generate_images(cli_run, ["A photo of a trouser."] * 3, keep=36, cfg_scale=3.0, top_k=50,
                                generator=torch.Generator().manual_seed(0))
    assert sample.indices.shape == (3, 36) and int(sample.source.max()) == 35
    assert x.shape == (3, 3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
    grid = torch.from_numpy(__import__("numpy").array(img)).float() / 255
    assert torch.allclose(grid[1:33, 1:33, 0], x[0, 0], atol=1 / 255 + 1e-6)
    # default keep: the most probable candidate (36 for mergevq-tiny)
    assert cli(["generate", str(cli_run), "a sneaker", "--out", str(tmp_path / "s.png")]) == 0
    assert "keep 36 of 64" in capsys.readouterr().out


def test_resume_is_bit_identical(tokenizer_dir, tmp_path):
    """6 uninterrupted steps == 5 steps (checkpoints at 2, 4, 5), resumed from step 4 to 6: weights, AdamW
    moments, the generator and the loss log agree bit for bit."""
    a = MergeARTrainer(config(tokenizer_dir, tmp_path / "a"), log=None)
    final_a = a.train()
    b = MergeARTrainer(config(tokenizer_dir, tmp_path / "b", steps=5), log=None)
    b.train()
    assert (tmp_path / "b/checkpoints/step-000005").is_dir()
    # "killed" after step 5's log line but resumed from step 4's checkpoint: the log is cut back to step 4
    c = MergeARTrainer(config(tokenizer_dir, tmp_path / "b", steps=6),
                       resume=str(tmp_path / "b/checkpoints/step-000004"), log=None)
    assert c.step == 4
    final_c = c.train()
    assert final_a.name == final_c.name == "step-000006"
    sa, sc = weights_and_optimizer(final_a), weights_and_optimizer(final_c)
    assert sa.keys() == sc.keys()
    for k in sa:
        assert torch.equal(sa[k], sc[k]), k
    la = (tmp_path / "a/metrics.jsonl").read_text().splitlines()
    lc = (tmp_path / "b/metrics.jsonl").read_text().splitlines()
    def strip(rows):
        return [{k: v for k, v in json.loads(r).items() if k != "seconds"} for r in rows]
    assert strip(la) == strip(lc) and len(la) == 6
    # and a model trained differently differs (the comparison can fail)
    d = MergeARTrainer(config(tokenizer_dir, tmp_path / "d", seed=1), log=None)
    key = "model.safetensors:pos_embed"
    assert not torch.equal(weights_and_optimizer(d.train())[key], sa[key])


def test_resume_auto_and_the_run_errors(tokenizer_dir, tmp_path):
    MergeARTrainer(config(tokenizer_dir, tmp_path / "r", steps=2), log=None).train()
    with pytest.raises(TrainingError, match="already holds checkpoints; pass --resume"):
        MergeARTrainer(config(tokenizer_dir, tmp_path / "r", steps=2), log=None)
    with pytest.raises(TrainingError, match=r"another configuration: lr: 0.001 -> 0.002"):
        MergeARTrainer(config(tokenizer_dir, tmp_path / "r", steps=4, lr=2e-3), resume="auto", log=None)
    t = MergeARTrainer(config(tokenizer_dir, tmp_path / "r", steps=3), resume="auto", log=None)
    assert t.step == 2 and t.train().name == "step-000003"
    # a time budget: stops before the step limit, and the budget counts over resumes
    t = MergeARTrainer(config(tokenizer_dir, tmp_path / "s", steps=10 ** 6, seconds=1e-9), log=None)
    assert t.train().name == "step-000001"


def _cli_error(argv, capsys) -> str:
    assert cli(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("fastvq: error: "), err
    return err


def test_command_errors(cli_run, tokenizer_dir, tmp_path, capsys):
    png = str(tmp_path / "x.png")
    err = _cli_error(["generate", str(cli_run), "A photo of a trouser.", "--keep", "30", "--out", png], capsys)
    assert "--keep 30 is not one of this MergeAR's trained keep candidates [25, 36, 49, 64]" in err
    err = _cli_error(["generate", str(cli_run), "A photo of a spaceship.", "--out", png], capsys)
    assert "names none of the classes" in err
    err = _cli_error(["train", "mergear", "--data", "fashion_mnist:8", "--out", str(tmp_path / "t")], capsys)
    assert "--tokenizer CKPT is required" in err
    err = _cli_error(["train", "mergear", "--tokenizer", str(tmp_path / "missing"), "--out", str(tmp_path / "t")],
                     capsys)
    assert "does not exist" in err
    err = _cli_error(["train", "mergear", "--tokenizer", str(tokenizer_dir), "--data", "emoji:8",
                      "--out", str(tmp_path / "t")], capsys)
    assert "has no class labels" in err
    err = _cli_error(["train", "mergear", "--tokenizer", str(tokenizer_dir), "--set", "model.width=3",
                      "--out", str(tmp_path / "t")], capsys)
    assert "MergeARConfig has no field 'width'" in err
    err = _cli_error(["train", "tokenizer", "--preset", "mergevq-tiny", "--seconds", "5"], capsys)
    assert "--seconds is for `fastvq train mergear`" in err


def test_keep_on_an_mllm_checkpoint_is_an_error(tokenizer_dir, tmp_path, capsys):
    """An MLLM (on the same MergeVQ) save_pretrained directory with its tokenizer/: --keep is refused by name."""
    from fastvq.models import from_pretrained
    from fastvq.models.mllm import MLLM, VisualCodec
    from fastvq.train.mllm import build_text_tokenizer
    tok = from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    mllm = MLLM.from_preset("mllm-tiny", codec=VisualCodec.from_tokenizer(tok),
                            text_tokenizer=build_text_tokenizer(["a photo of a trouser."]), dim=32, num_layers=1,
                            depth_layers=1, num_heads=2, num_kv_heads=1, code_dim=8, proj_heads=2)
    mllm.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m/tokenizer")
    assert not is_mergear_checkpoint(tmp_path / "m")
    err = _cli_error(["generate", str(tmp_path / "m"), "A photo of a trouser.", "--keep", "36",
                      "--out", str(tmp_path / "x.png")], capsys)
    assert "--keep applies to MergeAR checkpoints only" in err
    # without --keep the MLLM path still generates
    assert cli(["generate", str(tmp_path / "m"), "A photo of a trouser.", "--out", str(tmp_path / "m.png")]) == 0
    assert (tmp_path / "m.png").is_file()


def test_pipeline_mergear_stage_and_report(tokenizer_dir, tmp_path):
    """The main job's MergeAR stage on a micro recipe: checkpoint, sample grids at the two keeps, accuracy rows for
    the trained and untrained model, KV rows of the compacted cache (<= 2 + K) against the full one (L + 1), and
    the report section."""
    import shutil

    from fastvq.train.pipeline import MERGEAR_KEEPS, _mergear_report, _mergear_stage
    shutil.copytree(tokenizer_dir, tmp_path / "mergevq-tiny")
    m = _mergear_stage(tmp_path, 2, data="fashion_mnist:32", model=MICRO_DICT)
    assert m["steps"] == 2 and is_mergear_checkpoint(tmp_path / "mergear")
    assert [(r["model"], r["keep"]) for r in m["rows"]] == [(t, k) for t in ("untrained", "trained")
                                                            for k in MERGEAR_KEEPS]
    for r in m["rows"]:
        assert r["n"] == 50 and 0 <= r["accuracy"] <= 1
        assert r["kv_rows"] <= 2 + r["keep"] and r["full_kv_rows"] == 65 and r["kv_bytes"] < r["full_kv_bytes"]
    assert all(m["greedy_compacted_equals_full_forward"].values())
    for g in m["grids"]:
        assert (tmp_path / g["png"]).is_file()
    md = _mergear_report(m)
    assert "## MergeAR" in md and f"| trained | {MERGEAR_KEEPS[0]}/64 |" in md and "mergear/samples-keep" in md
    assert "keep 25: identical" in md
    assert _mergear_report({"skipped": "x"}).startswith("\n## MergeAR\n\nNot trained: x")
