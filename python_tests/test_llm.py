"""fastvq.models.llm: the decoder's cached paths equal its full forward; Hugging Face Llama weights load unchanged."""
import pytest
import torch

from fastvq.models.llm import Decoder, DecoderConfig, StaticKVCache, decoder_from_hf, new_cache
from fastvq.nn import CompressedKVCache, first_occurrence, merge_causal_mask

CFG = DecoderConfig(dim=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64)
KINDS = ("fastvq", "static")


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    return Decoder(CFG).eval()


def _inputs(B=3, L=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, CFG.dim, generator=g), torch.arange(L).expand(B, L).contiguous()


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_prefill_then_steps_equal_full_forward(decoder, kind):
    h, pos = _inputs()
    full = decoder(h, pos)
    cache = new_cache(CFG, 3, 32, kind)
    outs = [decoder(h[:, :5], pos[:, :5], cache=cache)]
    outs += [decoder.step(h[:, t], pos[:, t], cache)[:, None] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=2e-6, rtol=0)
    assert cache.lengths[0].tolist() == [12, 12, 12]


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_merge_mask_steps_equal_full_forward(decoder, kind):
    """Steps with keep = first occurrence == the full forward under merge_causal_mask; the fastvq cache keeps only
    the first occurrences."""
    h, pos = _inputs()
    groups = torch.tensor([[0, 1, 1, 2, 0, 3, 3, 3, 4, 1, 5, 2], [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2],
                           list(range(12))])
    full = decoder(h, pos, merge_causal_mask(groups))
    keep = first_occurrence(groups)
    cache = new_cache(CFG, 3, 12, kind)
    got = torch.stack([decoder.step(h[:, t], pos[:, t], cache, keep[:, t]) for t in range(12)], 1)
    torch.testing.assert_close(got, full, atol=2e-6, rtol=0)
    if kind == "fastvq":
        assert cache.lengths[0].tolist() == [6, 3, 12]
        assert cache.kept_positions(0).tolist() == [0, 1, 3, 5, 8, 10]


@torch.no_grad()
def test_ragged_prefill_compacts_kept_rows(decoder):
    """Right-padded prompts of lengths 2, 5, 3 prefill the fastvq cache to exactly those lengths; continuing each
    sequence at its own position equals that sequence's own full forward."""
    h, pos = _inputs(B=3, L=9)
    lens = torch.tensor([2, 5, 3])
    keep = torch.arange(5)[None] < lens[:, None]
    cache = new_cache(CFG, 3, 16, "fastvq")
    decoder(h[:, :5], pos[:, :5], cache=cache, keep=keep)
    assert cache.lengths[0].tolist() == [2, 5, 3]
    # sequence b continues with the tokens h[b, lens[b]:lens[b] + 4] at positions lens[b] ...
    cont = torch.stack([h[b, lens[b]:lens[b] + 4] for b in range(3)])
    steps = torch.stack([decoder.step(cont[:, t], lens + t, cache) for t in range(4)], 1)
    for b in range(3):
        n = int(lens[b]) + 4
        ref = decoder(h[b:b + 1, :n], pos[b:b + 1, :n])[0, -4:]
        torch.testing.assert_close(steps[b], ref, atol=2e-6, rtol=0)


def test_cache_capacity_and_input_errors(decoder):
    h, pos = _inputs(B=1, L=4)
    cache = new_cache(CFG, 1, 3, "fastvq")
    with pytest.raises(ValueError, match="exceed the cache's max_kept 3"):
        decoder(h, pos, cache=cache)
    static = new_cache(CFG, 1, 3, "static")
    with pytest.raises(ValueError, match="exceed max_len 3"):
        decoder(h, pos, cache=static)
    with pytest.raises(ValueError, match=r"h must be \[B, L, 64\]"):
        decoder(h[..., :8], pos)
    with pytest.raises(ValueError, match="positions must be int64"):
        decoder(h, pos.int())
    with pytest.raises(ValueError, match="past max_seq_len 64"):
        decoder(h, pos + 63)
    with pytest.raises(ValueError, match="kind must be 'fastvq' or 'static'"):
        new_cache(CFG, 1, 3, "paged")
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        DecoderConfig(dim=64, num_heads=4, num_kv_heads=3)
    assert isinstance(new_cache(CFG, 1, 3), CompressedKVCache) and isinstance(static, StaticKVCache)


def test_ffn_width_follows_llama_rule():
    assert DecoderConfig(dim=256).ffn_dim == 704  # 8/3 * 256 = 682.7 -> next multiple of 32
    assert DecoderConfig(dim=256, hidden_dim=100).ffn_dim == 100


@torch.no_grad()
def test_hugging_face_llama_weights_load_unchanged():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hc = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    hf = transformers.LlamaForCausalLM(hc).eval()
    dec, embed, head = decoder_from_hf(hf)
    assert dec.config.ffn_dim == 96 and dec.config.num_kv_heads == 2
    ids = torch.randint(0, 100, (2, 10))
    ref = hf(ids).logits
    got = head(dec(embed(ids), torch.arange(10).expand(2, 10)))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_compile_full_forward(decoder):
    h, pos = _inputs(B=2, L=8)
    with torch.no_grad():
        ref = decoder(h, pos)
        got = torch.compile(decoder, fullgraph=True, backend="aot_eager")(h, pos)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
