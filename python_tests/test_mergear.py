"""MergeAR (fastvq.models.mergear; docs/mergear.md): generation over the compressed KV cache equals the full-length
cache and the full forward under merge_causal_mask, training and generation agree, checkpoints, keep sampling and
the errors."""
import pytest
import torch

from fastvq.models import from_preset
from fastvq.models.mergear import (MergeAR, MergeARConfig, canonical_source, encode_for_mergear, generate_images,
                                   is_mergear_checkpoint, sample_batch, tokenizer_fingerprint, train_mergear)
from fastvq.nn import first_occurrence

KEEPS = (4, 9, 16)


def _model(seed=0, std=0.3, **kw):
    """A small MergeAR with large random weights, so that greedy decisions are far from ties."""
    cfg = dict(dim=64, num_layers=2, num_heads=4, num_kv_heads=2, grid=(4, 4), keep_candidates=KEEPS,
               keep_probs=(0.3, 0.4, 0.3), pointer_dim=32, cfg_dropout=0.0)
    cfg.update(kw)
    torch.manual_seed(seed)
    m = MergeAR(MergeARConfig(**cfg))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" not in name:
                p.normal_(0, std)
    return m.eval()


def _random_source(L, K, g):
    """A source map with K groups in first-occurrence order: K random first positions (0 among them), every other
    position repeats a random earlier group."""
    firsts = set((torch.randperm(L - 1, generator=g)[:K - 1] + 1).tolist()) | {0}
    src, n = [], 0
    for p in range(L):
        if p in firsts:
            src.append(n)
            n += 1
        else:
            src.append(int(torch.randint(n, (1,), generator=g)))
    return torch.tensor(src)


def _batch(model, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = model.config.num_positions
    keep = model.sample_keep(B, g)
    source = torch.stack([_random_source(L, int(k), g) for k in keep])
    indices = torch.randint(0, 2 ** 18, (B, L), generator=g)
    return indices.gather(1, source), source, keep, torch.arange(B) % 10


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("keep", [4, 9])
def test_compressed_cache_generation_equals_static_and_full_forward(cfg_scale, keep):
    m = _model()
    runs = {c: m.generate([1, 5, 7], keep=keep, cfg_scale=cfg_scale, temperature=0, cache=c, return_stats=True)
            for c in ("fastvq", "static", "none")}
    ref, _ = runs["none"]
    for c, (s, stats) in runs.items():
        assert torch.equal(s.indices, ref.indices), c
        assert torch.equal(s.source, ref.source), c
        assert torch.equal(s.codes, ref.indices.gather(1, ref.source)), c
    s, st = runs["fastvq"]
    assert torch.equal(s.source.amax(1) + 1, torch.full((3,), keep))          # exactly K groups
    assert (~first_occurrence(s.source)).any()                                  # repeats happened: the mask mattered
    batch = 6 if cfg_scale != 1.0 else 3
    # the cache holds the class and M rows and the first position of every group (the last position never runs
    # its step: nothing follows it)
    assert st["kv_rows"] == 2 + int(first_occurrence(s.source)[:, :-1].sum(1).max()) <= 2 + keep
    assert runs["static"][1]["kv_rows"] == 16 + 1
    # KV bytes: 2 layers, 2 kv heads, head dim 16, fp32, K and V; the compressed cache has one spare row
    assert st["kv_bytes"] == 2 * batch * 2 * (2 + keep + 1) * 16 * 4 * 2
    assert runs["static"][1]["kv_bytes"] == 2 * batch * 2 * 17 * 16 * 4 * 2


def test_greedy_generation_is_the_argmax_of_the_training_forward():
    """Teacher-forcing the generated tokens through forward: every slot and sub-code is the argmax."""
    m = _model(seed=1)
    s = m.generate([0, 3, 9, 2], keep=9, cfg_scale=1.0, temperature=0)
    out = m(s.codes, s.source, 9, torch.tensor([0, 3, 9, 2]))
    assert out["slot_accuracy"].item() == 1.0
    assert out["open_accuracy"].item() == 1.0
    assert out["code_accuracy"].item() == 1.0


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    m = _model(seed=2)
    a = m.generate([1, 2], keep=9, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    b = m.generate([1, 2], keep=9, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.source, b.source)
    greedy = m.generate([1, 2], keep=9, temperature=0)
    top1 = m.generate([1, 2], keep=9, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(4))
    assert torch.equal(greedy.source, top1.source) and torch.equal(greedy.indices, top1.indices)
    nucleus = m.generate([1, 2], keep=9, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(greedy.source, nucleus.source)


def test_one_optimizer_step_lowers_the_loss():
    m = _model(std=0.02)
    m.train()
    codes, source, keep, labels = _batch(m, B=8)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    before = m(codes, source, keep, labels)
    before["loss"].backward()
    opt.step()
    after = m(codes, source, keep, labels)
    assert after["loss"].item() < before["loss"].item() - 0.05
    assert before["slot_loss"] > 0 and before["code_loss"] > 0
    assert abs(before["loss"].item() - (before["slot_loss"] + before["code_loss"]).item()) < 1e-5


def test_the_loss_is_the_masked_slot_and_code_cross_entropy():
    """A hand-computed slot CE: at a position whose budget forces 'new' the only allowed slot is n (zero loss)."""
    m = _model(std=0.02)
    L = 16
    source = torch.tensor([list(range(L))])                                     # keep 16: every position new
    codes = torch.randint(0, 2 ** 18, (1, L), generator=torch.Generator().manual_seed(0))
    out = m(codes, source, 16, torch.tensor([0]))
    assert out["slot_loss"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["open_accuracy"].item() == 1.0


def test_save_load_round_trip(tmp_path):
    m = _model(seed=3)
    m.save_pretrained(tmp_path / "ar")
    m2 = MergeAR.from_pretrained(tmp_path / "ar")
    assert m2.config == m.config
    a = m.generate([4], keep=16, temperature=0)
    b = m2.generate([4], keep=16, temperature=0)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.source, b.source)
    (tmp_path / "ar" / "config.json").write_text('{"model": "mergevq", "config": {}}')
    with pytest.raises(ValueError, match="mergear"):
        MergeAR.from_pretrained(tmp_path / "ar")


def test_keep_sampling_uses_only_the_candidates():
    m = _model()
    keep = m.sample_keep(4000, torch.Generator().manual_seed(0))
    assert set(keep.tolist()) == set(KEEPS)
    freq = [(keep == k).float().mean().item() for k in KEEPS]
    assert freq == pytest.approx([0.3, 0.4, 0.3], abs=0.03)
    data = {"codes": torch.zeros(5, 3, 16, dtype=torch.long), "labels": torch.arange(5), "grid": (4, 4),
            "keep_candidates": KEEPS, "fingerprint": ""}
    data["source"] = torch.stack([torch.stack([_random_source(16, k, torch.Generator().manual_seed(i)) for k in KEEPS])
                                  for i in range(5)])
    codes, source, keep, labels = sample_batch(m, data, 64, torch.Generator().manual_seed(1))
    assert set(keep.tolist()) <= set(KEEPS)
    assert torch.equal(source.amax(1) + 1, keep)                                # the encoding at that keep


def test_canonical_source_relabels_in_first_occurrence_order():
    src = torch.tensor([[5, 5, 2, 9, 2, 5], [1, 0, 0, 1, 3, 3]])
    assert canonical_source(src).tolist() == [[0, 0, 1, 2, 1, 0], [0, 1, 1, 0, 2, 2]]


def test_prompts_resolve_to_classes():
    m = _model()
    got = m.resolve_labels(["A photo of an ankle boot.", "a small greyscale image of a T-shirt/top.", "a t-shirt",
                            "a shirt", "a product photo of sneaker.", 3]).tolist()
    assert got == [9, 0, 0, 6, 7, 3]


def test_bad_input_is_a_value_error_naming_the_argument():
    m = _model()
    with pytest.raises(ValueError, match="keep must be one of the trained keep_candidates"):
        m.generate([1], keep=5)
    with pytest.raises(ValueError, match="keep must be one of the trained keep_candidates"):
        m.generate([1], keep=True)
    codes, source, keep, labels = _batch(m)
    with pytest.raises(ValueError, match="source has 64 positions .* 4x4 grid"):
        m(torch.zeros(4, 64, dtype=torch.long), torch.zeros(4, 64, dtype=torch.long), keep, labels)
    with pytest.raises(ValueError, match="keep must be among the trained keep_candidates"):
        m(codes, source, torch.full((4,), 5), labels)
    wrong = keep.clone()
    wrong[0] = 16 if int(keep[0]) != 16 else 4
    with pytest.raises(ValueError, match="source of sample 0 has .* merge groups but its keep"):
        m(codes, source, wrong, labels)
    with pytest.raises(ValueError, match="codes must be in"):
        m(codes + 2 ** 18, source, keep, labels)
    with pytest.raises(ValueError, match="names none of the classes"):
        m.generate(["a photo of a cat"], keep=4)
    with pytest.raises(ValueError, match="cache must be"):
        m.generate([1], keep=4, cache="paged")


def test_tokenizer_round_trip_and_tokenizer_mismatch(tmp_path):
    """MergeVQ-tiny tokens at every candidate keep train MergeAR and decode; another tokenizer is refused."""
    torch.manual_seed(0)
    tok = from_preset("mergevq-tiny").eval()
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    data = encode_for_mergear(tok, images, torch.arange(6))
    assert data["codes"].shape == (6, 4, 64) and data["keep_candidates"] == (25, 36, 49, 64)
    for j, k in enumerate(data["keep_candidates"]):
        assert torch.equal(data["source"][:, j].amax(1) + 1, torch.full((6,), k))
    m = MergeAR.from_tokenizer(tok, dim=32, num_layers=1, num_heads=2, num_kv_heads=1, pointer_dim=16)
    assert m.config.code_split == (6, 12) and m.config.grid == (8, 8)
    assert m.config.tokenizer_hash == tokenizer_fingerprint(tok)
    hist = train_mergear(m, data, steps=2, batch_size=4, log=None)
    assert len(hist) == 2 and all(h["loss"] > 0 for h in hist)
    s = m.generate(["A photo of an ankle boot.", 2], keep=36, temperature=1.0,
                   generator=torch.Generator().manual_seed(0))
    assert s.indices.shape == (2, 36) and s.source.shape == (2, 64)
    assert m.decode(tok, s).shape == (2, 3, 32, 32)
    m.save_pretrained(tmp_path / "ar", tokenizer=tok)                        # the CLI's checkpoint
    assert is_mergear_checkpoint(tmp_path / "ar") and not is_mergear_checkpoint(tmp_path / "ar" / "tokenizer")
    images, sample = generate_images(tmp_path / "ar", ["a photo of a bag"], keep=25, temperature=1.0,
                                     generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert sample.indices.shape == (1, 25)
    other = from_preset("mergevq-tiny", inv_temperature=50.0)
    with pytest.raises(ValueError, match="tok is not the tokenizer this model was built for"):
        m.decode(other, s)
    with pytest.raises(ValueError, match="tok has a 16x16 grid"):
        m.check_tokenizer(from_preset("mergevq-tiny", image_size=64, eval_keep=144, keep_candidates=(121, 144),
                                      keep_probs=(0.5, 0.5)))
    with pytest.raises(ValueError, match="data comes from tokenizer"):
        train_mergear(m, dict(data, fingerprint=tokenizer_fingerprint(other)), steps=1, log=None)
    with pytest.raises(ValueError, match="data was encoded on a"):
        train_mergear(m, dict(data, grid=(4, 4)), steps=1, log=None)
    with pytest.raises(ValueError, match="tokenizer is not the tokenizer"):
        m.save_pretrained(tmp_path / "ar2", tokenizer=other)
    with pytest.raises(ValueError, match="source has 16 positions"):                # a map of another grid
        m.generate([1], keep=36, source=torch.zeros(1, 16, dtype=torch.long))
