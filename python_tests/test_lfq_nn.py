"""fastvq.nn.LFQ: vector-quantize-pytorch's conventions (keywords, named tuple, loss breakdown, masks,
channel-first, eval, indices -> codes), the fp32 island, usage statistics, presets, torch.compile and DDP, against
the pure-PyTorch reference lfq_loss_ref."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from ddp import run_ddp
from fastvq.nn import LFQ
from fastvq.nn._quantizer import QuantizeOutput
from fastvq.ops import lfq_entropy
from fastvq.reference import lfq_entropy_factorized_ref, lfq_loss_ref

CONFIGS = {
    "plain": dict(codebook_size=2 ** 10),
    "codebooks": dict(codebook_size=16, num_codebooks=3, inv_temperature=10.0, commitment_loss_weight=0.25),
    "spherical": dict(codebook_size=2 ** 12, spherical=True, commitment_loss_weight=1.0),
    "spherical-codebooks": dict(codebook_size=64, num_codebooks=2, spherical=True, codebook_scale=2.0,
                                inv_temperature=20.0),
    "siglu-lsb": dict(codebook_size=256, num_codebooks=2, bound="siglu", inv_temperature=2.0, bit_order="lsb"),
    "clamp-gamma": dict(codebook_size=256, soft_clamp_input_value=2.0, diversity_gamma=0.5,
                        commitment_loss_weight=0.1),
    "no-entropy": dict(codebook_size=2 ** 40, entropy_loss_weight=0.0, commitment_loss_weight=1.0),
}


def ref_kwargs(q: LFQ) -> dict:
    return dict(codebook_size=q.codebook_size, num_codebooks=q.num_codebooks, inv_temperature=q.inv_temperature,
                entropy_loss_weight=q.entropy_loss_weight, commitment_loss_weight=q.commitment_loss_weight,
                diversity_gamma=q.diversity_gamma, codebook_scale=q.codebook_scale, spherical=q.spherical,
                soft_clamp_input_value=q.soft_clamp_input_value, bound=q.bound, bit_order=q.bit_order)


def tols(dtype):
    return dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("masked", [False, True])
def test_module_matches_reference(config, dtype, masked):
    q = LFQ(**config)
    C = q.num_codebooks
    x = (torch.randn(3, 11, q.dim, dtype=dtype) * 0.3).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    mask = torch.rand(3, 11) > 0.3 if masked else None
    (quantized, indices, loss), breakdown = q(x, mask=mask, return_loss_breakdown=True)
    quantized_r, indices_r, loss_r, breakdown_r = lfq_loss_ref(x_ref, **ref_kwargs(q), mask=mask,
                                                               entropy_fn=lfq_entropy_factorized_ref)
    assert indices.shape == ((3, 11, C) if C > 1 else (3, 11)) and indices.dtype == torch.int64
    assert torch.equal(indices, indices_r if C > 1 else indices_r.squeeze(-1))
    assert quantized.shape == x.shape and quantized.dtype == dtype
    torch.testing.assert_close(quantized, quantized_r)
    torch.testing.assert_close(loss, loss_r, **tols(dtype))
    for k in ("per_sample_entropy", "codebook_entropy", "commitment"):
        torch.testing.assert_close(breakdown[k], breakdown_r[k], **tols(dtype))
    w = torch.randn_like(x)
    (loss + (quantized * w).sum()).backward()
    (loss_r + (quantized_r * w).sum()).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **tols(dtype))
    if masked:
        assert bool((indices[~mask] == -1).all()) and bool((quantized[~mask] == 0).all())
        assert bool((x.grad[~mask] == 0).all())
    codes = q.get_output_from_indices(indices)
    torch.testing.assert_close(codes.to(dtype), quantized.detach())  # the forward's values are the codes


def test_vector_quantize_pytorch_keywords_and_defaults():
    q = LFQ(codebook_size=65536, dim=16, entropy_loss_weight=0.1, diversity_gamma=1.0)
    assert (q.codebook_dim, q.num_codebooks, q.has_projections, q.keep_num_codebooks_dim) == (16, 1, False, False)
    assert (q.commitment_loss_weight, q.inv_temperature, q.bit_order, q.channel_first) == (0.0, 100.0, "msb", None)
    assert LFQ(dim=10).codebook_size == 1024
    m = LFQ(codebook_size=4096, dim=16, num_codebooks=4)  # 48 code dims != 16: projections
    assert m.has_projections and m.project_in.weight.shape == (48, 16) and m.keep_num_codebooks_dim
    quantized, indices, loss = m(torch.randn(1, 16, 4, 4))
    assert quantized.shape == (1, 16, 4, 4) and indices.shape == (1, 4, 4, 4)
    assert torch.equal(quantized, m.indices_to_codes(indices))
    assert LFQ(dim=12, codebook_size=16, has_projections=False, num_codebooks=3).project_in.__class__ is nn.Identity


def test_named_tuple_breakdown_and_eval():
    q = LFQ(codebook_size=256, commitment_loss_weight=0.5)
    x = torch.randn(4, 9, 8)
    out = q(x)
    assert isinstance(out, QuantizeOutput) and out.loss.item() != 0.0
    quantized, indices, loss = out
    (out2, breakdown) = q(x, return_loss_breakdown=True)
    want = 0.1 * (breakdown["per_sample_entropy"] - breakdown["codebook_entropy"]) + 0.5 * breakdown["commitment"]
    torch.testing.assert_close(out2.loss, want)
    counts = q.usage_counts.clone()
    q.eval()
    out_eval, breakdown_eval = q(x, return_loss_breakdown=True)
    assert out_eval.loss.item() == 0.0 and all(v.item() == 0.0 for v in breakdown_eval.values())
    assert torch.equal(out_eval.indices, indices) and torch.equal(out_eval.quantized, quantized)
    assert torch.equal(q.usage_counts, counts)  # eval forwards do not count
    torch.testing.assert_close(q(x, aux_loss_in_eval=True).loss, out2.loss)
    assert torch.equal(q.usage_counts, counts)
    assert LFQ(codebook_size=256, aux_loss_in_eval=True).eval()(x).loss.item() != 0.0
    # softplus entropy term
    s = LFQ(codebook_size=256, experimental_softplus_entropy_loss=True, entropy_loss_weight=1.0)
    (out, b) = s(x, return_loss_breakdown=True)
    torch.testing.assert_close(out.loss, F.softplus(b["per_sample_entropy"] - b["codebook_entropy"] + 5.0))


def test_forward_inv_temperature_overrides():
    q = LFQ(codebook_size=64, inv_temperature=100.0)
    x = torch.randn(30, 6) * 0.1
    _, b = q(x, inv_temperature=2.0, return_loss_breakdown=True)
    sample, codebook = lfq_entropy(x, 0.5, 6)
    torch.testing.assert_close(b["per_sample_entropy"], sample)
    torch.testing.assert_close(b["codebook_entropy"], codebook)


@pytest.mark.parametrize("shape", [(2, 8, 5, 3), (2, 8, 3, 2, 2)])
def test_channel_first(shape):
    q = LFQ(codebook_size=16, num_codebooks=2, commitment_loss_weight=0.3)
    x = torch.randn(*shape)
    quantized, indices, loss = q(x)  # channel_first=None: 4-d and larger inputs are channel-first
    last = x.movedim(1, -1)
    quantized_l, indices_l, loss_l = LFQ(codebook_size=16, num_codebooks=2, commitment_loss_weight=0.3,
                                         channel_first=False)(last)
    assert quantized.shape == x.shape and indices.shape == (*last.shape[:-1], 2)
    assert torch.equal(indices, indices_l) and torch.equal(quantized, quantized_l.movedim(-1, 1))
    torch.testing.assert_close(loss, loss_l)
    assert torch.equal(q.get_output_from_indices(indices), quantized)
    mask = torch.rand(last.shape[:-1]) > 0.5
    qm, im, _ = LFQ(codebook_size=16, num_codebooks=2, channel_first=True)(x, mask=mask)
    assert bool((im[~mask] == -1).all()) and bool((qm.movedim(1, -1)[~mask] == 0).all())
    seq = LFQ(codebook_size=16, num_codebooks=2, channel_first=True)(torch.randn(2, 8, 7))  # [B, C, N]
    assert seq.quantized.shape == (2, 8, 7) and seq.indices.shape == (2, 7, 2)


def test_masked_positions_change_nothing():
    torch.manual_seed(1)
    q = LFQ(dim=10, codebook_size=16, num_codebooks=2, commitment_loss_weight=0.25)  # with projections
    x = torch.randn(4, 6, 10)
    mask = torch.rand(4, 6) > 0.4
    y = x.clone()
    y[~mask] = float("nan")  # garbage at masked positions
    q2 = LFQ(dim=10, codebook_size=16, num_codebooks=2, commitment_loss_weight=0.25)
    q2.load_state_dict(q.state_dict())
    xg, yg = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    a, b = q(xg, mask=mask), q2(yg, mask=mask)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.quantized, b.quantized)
    assert torch.equal(a.loss, b.loss) and torch.isfinite(b.loss)
    assert bool((a.quantized[~mask] == 0).all()) and bool((a.indices[~mask] == -1).all())
    (a.loss + a.quantized.sum()).backward()
    (b.loss + b.quantized.sum()).backward()
    assert torch.equal(xg.grad, yg.grad) and bool((yg.grad[~mask] == 0).all())
    assert torch.equal(q.usage_counts, q2.usage_counts) and q.usage_counts.sum() == 2 * mask.sum()
    # the same as the kept rows alone
    c = LFQ(dim=10, codebook_size=16, num_codebooks=2, commitment_loss_weight=0.25)
    c.load_state_dict(q.state_dict())
    kept = c(x[mask])
    torch.testing.assert_close(kept.loss, a.loss)
    assert torch.equal(kept.indices, a.indices[mask])
    # every position masked: zero loss, no host sync needed
    none = q(x, mask=torch.zeros(4, 6, dtype=torch.bool))
    assert none.loss.item() == 0.0 and bool((none.indices == -1).all()) and bool((none.quantized == 0).all())


def test_indices_to_codes():
    q = LFQ(codebook_size=16, num_codebooks=2, spherical=True, codebook_scale=3.0)
    x = torch.randn(5, 8)
    quantized, indices, _ = q.eval()(x)
    codes = q.get_codes_from_indices(indices)
    assert codes.shape == (5, 8) and torch.equal(codes, quantized)
    torch.testing.assert_close(codes.view(5, 2, 4).norm(dim=-1), torch.full((5, 2), 3.0))
    indices[0, 1] = -1
    got = q.get_codes_from_indices(indices)
    assert bool((got[0, 4:] == 0).all()) and torch.equal(got[0, :4], codes[0, :4])
    assert torch.equal(q.indices_to_codes(indices), got)
    p = LFQ(dim=6, codebook_size=16)  # with projections: -1 is a zero output, not project_out's bias
    indices = torch.tensor([[3, -1]])
    out = p.get_output_from_indices(indices)
    assert out.shape == (1, 2, 6) and bool((out[0, 1] == 0).all())
    torch.testing.assert_close(out[0, 0], p.project_out(p.get_codes_from_indices(indices)[0, 0]))
    torch.testing.assert_close(p.indices_to_codes(indices, project_out=False), p.get_codes_from_indices(indices))


def test_fp32_island_under_autocast():
    q = LFQ(codebook_size=2 ** 12, commitment_loss_weight=0.25)
    x = torch.randn(64, 12) * 0.02  # small values: bf16 rounding would flip signs and change the entropy
    want = q(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = q(x)
    assert torch.equal(got.indices, want.indices) and got.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
    bf = q(x.bfloat16())
    assert bf.quantized.dtype == torch.bfloat16 and bf.loss.dtype == torch.float32
    assert torch.equal(bf.indices, q(x.bfloat16().float()).indices)


def test_usage_counts_state_dict_and_statistics():
    q = LFQ(codebook_size=4, num_codebooks=2, inv_temperature=1.0)
    assert "usage_counts" in q.state_dict() and q.usage_counts.shape == (2, 4)
    assert q.last_code_probs is None and q.last_perplexity is None
    # msb: rows [+, -, -, -] and [-, +, -, -]: codebook 0 sees 2 and 1, codebook 1 sees 0 twice
    z = torch.tensor([[1.0, -1.0, -1.0, -1.0], [-1.0, 1.0, -1.0, -1.0]])
    _, indices, _ = q(z)
    assert indices.tolist() == [[2, 0], [1, 0]]
    assert q.usage_counts.tolist() == [[0, 1, 1, 0], [2, 0, 0, 0]]
    torch.testing.assert_close(q.codebook_usage(), torch.tensor([0.5, 0.25]))
    _, _, code_probs = lfq_entropy(z, 1.0, 2, return_code_probs=True)
    torch.testing.assert_close(q.last_code_probs, code_probs)
    torch.testing.assert_close(q.last_perplexity, torch.exp(-(code_probs * code_probs.log()).sum(-1)))
    r = LFQ(codebook_size=4, num_codebooks=2)
    r.load_state_dict(q.state_dict())
    assert torch.equal(r.usage_counts, q.usage_counts)
    q.reset_usage()
    assert q.usage_counts.sum() == 0 and q.last_code_probs is None
    big = LFQ(codebook_size=2 ** 20)  # 2^20 codes: not counted, entropy still exact
    assert big.usage_counts is None and "usage_counts" not in big.state_dict()
    big(torch.randn(3, 20))
    assert big.last_code_probs.shape == (1, 1 << 20)
    with pytest.raises(RuntimeError, match="LFQ: usage is counted for codebooks of at most 2\\^18 codes"):
        big.codebook_usage()


@pytest.mark.parametrize("preset, dim, codebook_size, num_codebooks", [
    (lambda: LFQ.mergevq(), 18, 2 ** 18, 1),
    (lambda: LFQ.bsq(), 18, 2 ** 18, 1),
    (lambda: LFQ.bsq(dim=36), 36, 2 ** 18, 2),
    (lambda: LFQ.uniwetok(), 128, 256, 16),
    (lambda: LFQ.uniwetok(codebook_size=65536), 128, 65536, 8),
], ids=["mergevq", "bsq18", "bsq36", "uniwetok8", "uniwetok16"])
def test_presets(preset, dim, codebook_size, num_codebooks):
    q = preset()
    assert (q.dim, q.codebook_size, q.num_codebooks, q.has_projections) == (dim, codebook_size, num_codebooks, False)
    x = torch.randn(2, 8, dim, requires_grad=True)
    quantized, indices, loss = q(x)
    assert indices.shape == ((2, 8) if num_codebooks == 1 else (2, 8, num_codebooks))
    quantized_r, indices_r, loss_r, _ = lfq_loss_ref(x.detach(), **ref_kwargs(q), entropy_fn=lfq_entropy_factorized_ref)
    assert torch.equal(indices, indices_r.squeeze(-1) if num_codebooks == 1 else indices_r)
    torch.testing.assert_close(quantized, quantized_r)
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-5)
    (loss + quantized.square().sum()).backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    torch.testing.assert_close(q.get_output_from_indices(indices), quantized.detach())


def test_preset_settings_and_overrides():
    m = LFQ.mergevq()
    assert (m.inv_temperature, m.entropy_loss_weight, m.commitment_loss_weight, m.spherical, m.bound) == (
        100.0, 0.1, 0.25, False, None)
    assert LFQ.bsq(36).spherical and LFQ.bsq(36).num_codebooks == 2
    u = LFQ.uniwetok(65536, entropy_loss_weight=0.05)
    assert u.bound == "siglu" and u.num_codebooks == 8 and u.entropy_loss_weight == 0.05
    assert m.bit_order == "lsb" and LFQ.mergevq(bit_order="msb").bit_order == "msb"  # Open-MAGVIT2's order
    assert LFQ.bsq().bit_order == "msb" and LFQ.uniwetok().bit_order == "msb"
    with pytest.raises(ValueError, match="LFQ.bsq: dim must be 18 or 36"):
        LFQ.bsq(dim=20)
    with pytest.raises(ValueError, match="LFQ.uniwetok: codebook_size must be 256 or 65536"):
        LFQ.uniwetok(codebook_size=16)


@pytest.mark.parametrize("kwargs, match", [
    (dict(), r"LFQ: either dim or codebook_size must be given"),
    (dict(codebook_size=1000), r"LFQ: codebook_size must be a power of 2"),
    (dict(codebook_size=2 ** 63, entropy_loss_weight=0.0), r"LFQ: codebook_size=2\^63 does not fit an int64"),
    (dict(codebook_size=2 ** 28), r"LFQ: the entropy loss .* needs d <= 24"),
    (dict(dim=10, num_codebooks=3), r"LFQ: dim=10 must be a positive multiple of num_codebooks=3"),
    (dict(codebook_size=16, num_codebooks=2, keep_num_codebooks_dim=False), r"keep_num_codebooks_dim=False"),
    (dict(dim=8, bit_order="big"), r'LFQ: bit_order must be "msb" or "lsb", got \'big\''),
    (dict(dim=8, bound="tanh"), r'LFQ: bound must be None or "siglu"'),
    (dict(dim=8, inv_temperature=0.0), r"LFQ: inv_temperature must be positive"),
    (dict(dim=8, soft_clamp_input_value=0.5), r"LFQ: soft_clamp_input_value=0.5 must be >= codebook_scale"),
    (dict(dim=8, frac_per_sample_entropy=0.5), r"LFQ: frac_per_sample_entropy < 1 is not supported"),
    (dict(dim=8, orthogonal_rotation=True), r"LFQ: cosine_sim_project_in, orthogonal_rotation"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LFQ(**kwargs)


def test_bad_input():
    q = LFQ(codebook_size=256, num_codebooks=2)
    with pytest.raises(ValueError, match=r"LFQ: x must have 16 channels"):
        q(torch.randn(3, 9))
    with pytest.raises(ValueError, match=r"LFQ: mask must have x's token shape \[3\]"):
        q(torch.randn(3, 16), mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"LFQ: mask must be a bool tensor"):
        q(torch.randn(3, 16), mask=torch.ones(3))
    with pytest.raises(ValueError, match=r"LFQ: indices must be \[\.\.\., 2\]"):
        q.get_codes_from_indices(torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"lfq_codes_from_indices: indices must be in \[0, 2\^8\)"):
        q.get_codes_from_indices(torch.tensor([[0, 256]]))
    with pytest.raises(TypeError, match=r"LFQ: indices must be int64"):
        q.get_codes_from_indices(torch.zeros(3, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"LFQ: x must be channel-first"):
        LFQ(codebook_size=16, channel_first=True)(torch.randn(3, 4))


def test_training_moves_entropy_terms():
    """SGD on x alone: the entropy loss makes bits confident and spreads a collapsed batch over the codebook;
    the commitment loss alone pulls x to the codes at exactly the rate mse's gradient gives."""
    torch.manual_seed(2)
    x = nn.Parameter(1.0 + 0.3 * torch.randn(64, 6))  # nearly every row on the all-ones code
    q = LFQ(codebook_size=64, inv_temperature=1.0, entropy_loss_weight=1.0)
    opt = torch.optim.SGD([x], lr=1.0)
    first = lfq_entropy(x.detach(), 1.0)
    losses = []
    for _ in range(40):
        loss = q(x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    last = lfq_entropy(x.detach(), 1.0)
    assert losses[-1] < losses[0] - 0.5 and last[1] > first[1] + 0.5
    assert q.codebook_usage().item() > 2 / 64
    c = LFQ(codebook_size=64, entropy_loss_weight=0.0, commitment_loss_weight=1.0)
    xc = nn.Parameter(torch.randn(32, 6, dtype=torch.float64))
    opt = torch.optim.SGD([xc], lr=32 * 6 / 4)
    losses = []
    for _ in range(5):
        loss = c(xc).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses == pytest.approx([losses[0] * 0.25 ** k for k in range(5)], rel=1e-9)


@pytest.mark.parametrize("config", ["siglu-lsb"])
def test_torch_compile_fullgraph(config):
    torch._dynamo.reset()
    counters.clear()
    q_eager, q_compiled = LFQ(**CONFIGS[config]), LFQ(**CONFIGS[config])
    compiled = torch.compile(q_compiled, fullgraph=True)
    x = torch.randn(6, 7, q_eager.dim) * 0.3
    mask = torch.rand(6, 7) > 0.3

    def run(module):
        for _ in range(2):  # the second call runs the cached graph
            xi = x.clone().requires_grad_(True)
            quantized, indices, loss = module(xi, mask=mask)
            (loss + quantized.sum()).backward()
        return quantized.detach(), indices, loss.detach(), xi.grad

    for got, want in zip(run(compiled), run(q_eager)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1  # one graph, compiled once, reused
    assert torch.equal(q_compiled.usage_counts, q_eager.usage_counts)
    torch.testing.assert_close(q_compiled.last_code_probs, q_eager.last_code_probs)


# ---- DDP: 2 gloo ranks under torchrun ---------------------------------------------------------------------

class Tiny(nn.Module):
    """An encoder, an LFQ with projections and two codebooks, a decoder."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(5, 10)
        self.q = LFQ(dim=10, codebook_size=16, num_codebooks=2, commitment_loss_weight=0.25, inv_temperature=5.0)
        self.dec = nn.Linear(10, 5)

    def forward(self, x, mask=None):
        quantized, indices, aux = self.q(self.enc(x), mask=mask)
        return F.mse_loss(self.dec(quantized), x) + aux, indices


DDP_BODY = '''
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from test_lfq_nn import Tiny, ddp_batches
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = DDP(Tiny())
opt = torch.optim.SGD(model.parameters(), lr=0.1)
out = {}
for step, (x, mask) in enumerate(ddp_batches()):
    x, mask = x.chunk(2)[rank], mask.chunk(2)[rank]
    loss, _ = model(x, mask=None if step == 0 else mask)
    opt.zero_grad()
    loss.backward()
    if step == 0:
        out["loss"] = loss.detach()
        out.update({"grad." + k: p.grad for k, p in model.module.named_parameters()})
    out[f"code_probs{step}"] = model.module.q.last_code_probs
    opt.step()
out.update({"param." + k: p for k, p in model.module.named_parameters()})
out["usage"] = model.module.q.usage_counts
save_rank(out)
'''


def ddp_batches():
    """Three global batches of 2 x 4 sequences: the first unmasked, then with masks (different counts per
    rank)."""
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(8, 6, 5, generator=g), torch.rand(8, 6, generator=g) > 0.3) for _ in range(3)]


def test_ddp_matches_one_process_on_the_concatenated_batch(tmp_path, monkeypatch):
    here = os.path.dirname(os.path.abspath(__file__))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    ranks = run_ddp(DDP_BODY, tmp_path)
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, (x, mask) in enumerate(ddp_batches()):
        loss, _ = model(x, mask=None if step == 0 else mask)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            # equal batches: the mean of the ranks' losses and the averaged gradients are the one process's
            torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss.detach())
            for k, p in model.named_parameters():
                for r in ranks:
                    torch.testing.assert_close(r["grad." + k], p.grad, rtol=1e-5, atol=1e-6)
        # the codebook entropy's distribution is the global batch's, also with different mask counts per rank
        # (step 1; after it the ranks' per-sample terms are means over different counts, as in any DDP loss)
        if step < 2:
            for r in ranks:
                torch.testing.assert_close(r[f"code_probs{step}"], model.q.last_code_probs, rtol=1e-5, atol=1e-7)
        opt.step()
    for k in ranks[0]:
        if k.startswith("param.") or k == "usage":
            assert torch.equal(ranks[0][k], ranks[1][k]), f"{k} differs across ranks"
    assert torch.equal(ranks[0]["usage"], model.q.usage_counts)  # all-reduced counts = one process's counts
