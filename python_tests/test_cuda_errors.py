"""Bad values on the CUDA backend: the host code rejects them before any launch, with the CPU op's exception
type and words, so a user error never becomes a device-side assert (which poisons the CUDA context); and the
kernels guard every data-dependent index themselves, so even unchecked values never leave a buffer.

Run on the CUDA kernels' own source through the emulation build (torch.ops.fastvq_emu.*), and on a real
device when one is present. scripts/test.sh runs the emulated cases again under AddressSanitizer, where an
out-of-bounds access in the unchecked cases aborts the process.
"""
import pytest
import torch

import fastvq.emu as emu
from conftest import EMU_MISSING

needs_emu = pytest.mark.skipif(EMU_MISSING is not None, reason=str(EMU_MISSING))
HAS_CUDA = torch.cuda.is_available()
NAN = float("nan")


def _idx(shape, at, value, dtype=torch.long):
    t = torch.zeros(shape, dtype=dtype)
    t[at] = value
    return t


def _cache(B=2, Hkv=2, L=6, D=8, Hq=4):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, D, generator=g)
    k, v = torch.randn(B, Hkv, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    kn, vn = torch.randn(B, Hkv, D, generator=g), torch.randn(B, Hkv, D, generator=g)
    return q, k, v, kn, vn


def _merge_inputs(sizes_fix):
    g = torch.Generator().manual_seed(0)
    x, metric = torch.randn(2, 9, 3, generator=g), torch.randn(2, 9, 4, generator=g)
    sizes = torch.ones(2, 9)
    sizes_fix(sizes)
    return x, metric, sizes, 3, False


def _decode(lengths, op, keep=(True, False)):
    q, k, v, kn, vn = _cache()
    keep = torch.tensor(keep)
    if op == "decode_attention":
        return q, k, v, lengths, None, None
    if op == "kv_append":
        return k, v, lengths, kn, vn, keep
    return q, k, v, lengths, kn, vn, keep, None, None


# (id, op, inputs, guard): `guard(out, inputs)` checks what the guarded kernels produce from the unchecked
# value (None: only that every access stays in bounds, which the ASan run checks).
CASES = [
    ("mcq_gather-past-K", "mcq_gather", lambda: (_idx((5, 2), (3, 1), 4), torch.randn(2, 4, 3)),
     lambda out, a: bool(out[3, 1].isnan().all()) and not out[:3].isnan().any()),
    ("mcq_gather-negative-int32", "mcq_gather", lambda: (_idx((5, 2), (0, 0), -2, torch.int32), torch.randn(2, 4, 3)),
     lambda out, a: bool(out[0, 0].isnan().all()) and not out[1:].isnan().any()),
    ("mcq_gather-empty-codebook", "mcq_gather", lambda: (_idx((5, 2), (1, 1), -1), torch.randn(2, 0, 3)),
     lambda out, a: bool(out[1, 1].eq(0).all()) and bool(out[0].isnan().all())),  # -1 still gives zeros
    ("mcq_gather-d0", "mcq_gather", lambda: (_idx((5, 2), (2, 0), 9), torch.randn(2, 4, 0)), None),
    ("lfq_codes_from_indices-2^g", "lfq_codes_from_indices", lambda: (_idx((5, 2), (3, 1), 256), 16, 8, None), None),
    ("lfq_codes_from_indices-negative", "lfq_codes_from_indices", lambda: (_idx((5, 2), (1, 0), -1), 16, 8, None), None),
    ("lfq_codes_from_indices-ungrouped", "lfq_codes_from_indices", lambda: (_idx((4,), (2,), 1 << 12), 12, 0, None), None),
    ("bipartite_merge-negative-size", "bipartite_merge", lambda: _merge_inputs(lambda s: s.__setitem__((1, 6), -1.0)),
     None),
    ("bipartite_merge-zero-size", "bipartite_merge", lambda: _merge_inputs(lambda s: s.__setitem__((0, 0), 0.0)), None),
    ("bipartite_merge-nan-size", "bipartite_merge", lambda: _merge_inputs(lambda s: s.__setitem__((1, 8), NAN)), None),
    ("bipartite_merge_backward-assign", "bipartite_merge_backward",
     lambda: (torch.randn(2, 5, 3), torch.ones(2, 9), torch.ones(2, 5), _idx((2, 9), (1, 2), 5)),
     lambda out, a: bool(out[1, 2].isnan().all()) and not out[0].isnan().any()),
    ("bipartite_merge_backward-negative", "bipartite_merge_backward",
     lambda: (torch.randn(2, 5, 3), torch.ones(2, 9), torch.ones(2, 5), _idx((2, 9), (0, 0), -1)),
     lambda out, a: bool(out[0, 0].isnan().all()) and not out[1].isnan().any()),
    ("compose_source", "compose_source", lambda: (_idx((2, 9), (1, 2), 7), torch.zeros(2, 5, dtype=torch.long)),
     lambda out, a: out[1, 2].item() == -1 and (out[0] == 0).all()),
    ("unmerge", "unmerge", lambda: (torch.randn(2, 5, 3), _idx((2, 9), (1, 2), 5)),
     lambda out, a: bool(out[1, 2].isnan().all()) and not out[0].isnan().any()),
    ("unmerge-negative", "unmerge", lambda: (torch.randn(2, 5, 3), _idx((2, 9), (0, 4), -3)),
     lambda out, a: bool(out[0, 4].isnan().all()) and not out[1].isnan().any()),
    ("unmerge_backward", "unmerge_backward", lambda: (torch.randn(2, 9, 3), _idx((2, 9), (1, 2), 5), 5),
     lambda out, a: torch.allclose(out[1, 0], a[0][1, [0, 1, 3, 4, 5, 6, 7, 8]].sum(0), atol=1e-5)),  # bad entry dropped
    ("decode_attention-past-Lmax", "decode_attention", lambda: _decode(torch.tensor([3, 7]), "decode_attention"),
     lambda out, a: out.isfinite().all()),
    ("decode_attention-negative-int32", "decode_attention",
     lambda: _decode(torch.tensor([-2, 4], dtype=torch.int32), "decode_attention"), lambda out, a: (out[0] == 0).all()),
    ("kv_append-past-Lmax", "kv_append", lambda: _decode(torch.tensor([0, 9]), "kv_append"), None),
    ("kv_append-full", "kv_append", lambda: _decode(torch.tensor([6, 0]), "kv_append"),
     lambda out, a: a[2].tolist() == [6, 0]),  # no free row: nothing written, the length unchanged
    ("decode_step-full", "decode_step", lambda: _decode(torch.tensor([3, 6]), "decode_step", keep=(False, False)),
     lambda out, a: out.isfinite().all() and a[3].tolist() == [3, 6]),
    ("decode_step-negative", "decode_step", lambda: _decode(torch.tensor([-1, 2]), "decode_step"), None),
]
IDS = [c[0] for c in CASES]


def _clone(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _to(args, device):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def _error(fn, args):
    with pytest.raises(Exception) as info:
        fn(*args)
    return info.value


def _same_error(got, want):
    assert type(got) is type(want), f"{type(got).__name__} != {type(want).__name__}: {got}"
    # the message proper (a C++ trace may follow it when TORCH_SHOW_CPP_STACKTRACES is set)
    assert str(got).splitlines()[0] == str(want).splitlines()[0]


@needs_emu
@pytest.mark.parametrize(("name", "op", "make", "guard"), CASES, ids=IDS)
def test_emulated_bad_values_raise_the_cpu_error(name, op, make, guard):
    args = make()
    want = _error(getattr(torch.ops.fastvq, op), _clone(args))
    emu_args = _clone(args)
    _same_error(_error(getattr(torch.ops.fastvq_emu, op), emu_args), want)
    for a, b in zip(emu_args, args):  # rejected before any write (kv_append / decode_step mutate in place)
        if isinstance(a, torch.Tensor):
            assert torch.equal(a.nan_to_num(), b.nan_to_num())


@needs_emu
@pytest.mark.parametrize(("name", "op", "make", "guard"), CASES, ids=IDS)
def test_emulated_kernels_guard_unchecked_values(name, op, make, guard):
    # No host check, no kernel assert: the kernels' own guards must keep every access in bounds (the ASan
    # run of scripts/test.sh aborts on any that does not) and produce the documented fallback.
    args = make()
    with emu.unchecked():
        out = getattr(torch.ops.fastvq_emu, op)(*args)
    if guard is not None:
        assert guard(out, args)
    # checks are back on afterwards
    _same_error(_error(getattr(torch.ops.fastvq_emu, op), _clone(make())),
                _error(getattr(torch.ops.fastvq, op), _clone(make())))


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize(("name", "op", "make", "guard"), CASES, ids=IDS)
def test_cuda_bad_values_raise_the_cpu_error_and_keep_the_context(name, op, make, guard):
    args = make()
    want = _error(getattr(torch.ops.fastvq, op), _clone(args))
    _same_error(_error(getattr(torch.ops.fastvq, op), _to(args, "cuda")), want)
    torch.cuda.synchronize()  # a device-side assert would surface here, and poison every later call
    idx = torch.randint(0, 4, (5, 2), device="cuda")
    cb = torch.randn(2, 4, 3, device="cuda")
    assert torch.equal(torch.ops.fastvq.mcq_gather(idx, cb).cpu(), torch.ops.fastvq.mcq_gather(idx.cpu(), cb.cpu()))


def test_value_check_cases_fail_on_the_cpu():
    # every case is a bad value for the CPU op too (the oracle of the tests above)
    for name, op, make, _ in CASES:
        with pytest.raises((RuntimeError, IndexError, ValueError)):
            getattr(torch.ops.fastvq, op)(*make())
