"""fastvq.train under DDP: 2 gloo processes (torchrun, python_tests/ddp.py) against one process with the same
global batch. The micro VQGAN of test_train.py with its discriminator on from step 2, gradient accumulation 2."""
import json
from pathlib import Path

import pytest
import torch

from ddp import run_ddp
from fastvq.train import TrainConfig, Trainer
from test_train import MICRO, losses

# Loss-curve tolerance between 2 ranks and 1 process: DDP averages the two half-batch gradients, one process
# takes the gradient of the whole batch; the sums differ in fp32 rounding only, and so do the next steps' losses.
LOSS_RTOL = 1e-5


def config(out: Path) -> TrainConfig:
    return TrainConfig(preset="vqgan-tiny", model=dict(MICRO, dead_code_threshold=0.0), image_size=16, steps=4,
                       batch_size=8, grad_accum=2, warmup_steps=2, log_every=1, ckpt_every=2, eval_n=8,
                       captions=False, disc_start=2, disc_ndf=8, disc_layers=2, out=str(out))


def test_two_processes_match_one_and_stay_identical(tmp_path):
    ddp_cfg = config(tmp_path / "ddp")
    script = f"""
    import torch
    torch.set_num_threads(1)
    from fastvq.train import TrainConfig, Trainer
    t = Trainer(TrainConfig.from_dict({ddp_cfg.to_dict()!r}), progress=False)
    t.train()
    state = {{"model." + k: v for k, v in t.model.state_dict().items()}}
    state.update({{"disc." + k: v for k, v in t.gan.state_dict().items()}})
    state["vq_acc_usage"] = t.model.quantizer.acc_usage
    save_rank(state)
    """
    ranks = run_ddp(script, tmp_path, nproc=2)
    # codebooks, their statistics, every weight and the discriminator: bit-identical on both ranks
    assert ranks[0].keys() == ranks[1].keys()
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    assert int(ranks[0]["model.quantizer.update_steps"]) == 4
    # rank 0 alone logs and checkpoints: one line per step and one evaluation, one set of checkpoints
    log = [json.loads(line) for line in (tmp_path / "ddp/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 4] and "eval" in log[-1]
    assert sorted(p.name for p in (tmp_path / "ddp/checkpoints").iterdir()) == ["latest", "step-000002",
                                                                               "step-000004"]
    state = json.loads((tmp_path / "ddp/checkpoints/step-000004/state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = Trainer(config(tmp_path / "one"), progress=False)
        one.train()
    finally:
        torch.set_num_threads(before)
    curve_ddp, curve_one = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert [s for s, _ in curve_ddp] == [s for s, _ in curve_one] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(curve_ddp, curve_one):
        assert a == pytest.approx(b, rel=LOSS_RTOL)
    gan = [json.loads(line).get("gan_d") for line in (tmp_path / "ddp/metrics.jsonl").read_text().splitlines()]
    assert gan[2] is not None and gan[2] > 0  # the discriminator trained from step 2 on
    one_state = one.model.state_dict()
    torch.testing.assert_close(ranks[0]["model.quantizer.embed"], one_state["quantizer.embed"], rtol=1e-4, atol=1e-5)
