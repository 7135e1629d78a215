"""fastvq.models.mllm: the unified MLLM (docs/mllm.md). Generation against repeated full forward passes (both caches,
both adapters, CFG on and off, ragged prompts), loss masks, CFG dropout, z-loss, checkpoints, the Hugging Face
backbone, the text tokenizer, the visual codecs, and bad input. Micro configs on CPU, seeded."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import fastvq.models.mllm as mllm_mod
from fastvq.models import MLLM, MLLMConfig, TextTokenizer, VisualCodec, from_preset
from fastvq.models.mllm import WEIGHTS_NAME, sample_logits

CORPUS = ["A photo of an ankle boot.", "A small greyscale image of a T-shirt/top.", "a red heart", "a blue sky",
          "what is this?", "a photo of a bag", "an image of a sneaker"]
PROMPTS = ["a red heart", "a small greyscale photo of an ankle boot", "a bag"]   # ragged lengths


@pytest.fixture(autouse=True)
def _threads():
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tt():
    return TextTokenizer.from_corpus(CORPUS)


def micro(tt, adapter="mcq", group_sizes=(16, 16, 16), grid=(2, 3), depth_layers=2, **kw):
    kind = "mcq" if len(set(group_sizes)) == 1 else "bits"
    codec = VisualCodec(kind, group_sizes, grid, tokenizer="synthetic")
    cfg = MLLMConfig(text_vocab_size=tt.vocab_size, codec=codec.to_dict(), dim=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, depth_layers=depth_layers, adapter=adapter, code_dim=16, proj_heads=4,
                     max_text_len=12, **kw)
    torch.manual_seed(1)
    m = MLLM(cfg, tt)
    with torch.no_grad():  # larger weights than the 0.02 init: well-separated logits, a sharper equality test
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(5.0)
    return m.eval()


def random_codes(codec, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, k, (B, codec.num_positions), generator=g) for k in codec.group_sizes], -1)


def full_forward_logits(m, prompts, codes, cfg_scale):
    """Per group ``[B, L, K_g]`` image logits of one full forward over ``[bos] prompt [boi] codes`` (CFG-combined with
    the ``[bos] [boi]`` rows when ``cfg_scale``)."""
    with torch.no_grad():
        cond = m.image_logits(m.collate(codes, prompts, "t2i"))
        if not cfg_scale:
            return cond
        unc = m.image_logits(m.collate(codes, prompts, "t2i", drop_prompt=torch.ones(len(prompts), dtype=torch.bool)))
        return [u + cfg_scale * (c - u) for c, u in zip(cond, unc)]


# ---- generation == repeated full forward passes ----------------------------------------------------------------

@pytest.mark.parametrize("adapter,group_sizes,depth_layers", [("mcq", (16, 16, 16), 2), ("bits", (8, 32), 2),
                                                              ("bits", (32,), 0), ("mcq", (8, 16), 0)])
@pytest.mark.parametrize("cache", ["fastvq", "static"])
@pytest.mark.parametrize("cfg_scale", [None, 3.0])
def test_greedy_equals_repeated_full_forward(tt, adapter, group_sizes, depth_layers, cache, cfg_scale, monkeypatch):
    m = micro(tt, adapter, group_sizes, depth_layers=depth_layers)
    seen = []
    real = mllm_mod.sample_logits
    monkeypatch.setattr(mllm_mod, "sample_logits", lambda lg, **kw: (seen.append(lg.clone()), real(lg, **kw))[1])
    codes = m.generate_images(PROMPTS, cfg_scale=cfg_scale or 1.0, temperature=0.0, cache=cache)
    B, L, G = codes.shape
    assert (B, L, G) == (3, 6, len(group_sizes))
    assert len(seen) == L * G
    worst = 0.0
    for i in range(L):
        # a fresh full forward per position, with junk after position i (it must not matter: causal)
        probe = codes.clone()
        probe[:, i + 1:] = random_codes(m.codec, B, seed=i)[:, i + 1:]
        logits = full_forward_logits(m, PROMPTS, probe, cfg_scale)
        for g in range(G):
            ref = logits[g][:, i]
            assert torch.equal(ref.argmax(-1), codes[:, i, g]), (i, g)
            worst = max(worst, (seen[i * G + g] - ref).abs().max().item())
    # the stated tolerance: step logits (prefill + Decoder.step + incremental adapter + depth steps) equal the full
    # forward's within 1e-4 absolute, fp32, for logits of magnitude ~10
    assert worst < 1e-4, worst


def test_fastvq_cache_equals_static_cache_sampled(tt):
    m = micro(tt, "mcq")
    out = {}
    for cache in ("fastvq", "static"):
        g = torch.Generator().manual_seed(123)
        out[cache] = m.generate_images(PROMPTS, cfg_scale=2.0, temperature=1.0, top_k=8, top_p=0.9, generator=g,
                                       cache=cache)
    assert torch.equal(out["fastvq"], out["static"])
    g = torch.Generator().manual_seed(124)
    other = m.generate_images(PROMPTS, cfg_scale=2.0, temperature=1.0, top_k=8, top_p=0.9, generator=g)
    assert not torch.equal(other, out["fastvq"])   # the seed matters: the sampler is not greedy


@pytest.mark.parametrize("cache", ["fastvq", "static"])
def test_ragged_batch_equals_one_by_one(tt, cache):
    m = micro(tt, "bits", (8, 32))
    batch = m.generate_images(PROMPTS, cfg_scale=2.5, temperature=0.0, cache=cache)
    for b, p in enumerate(PROMPTS):
        assert torch.equal(m.generate_images([p], cfg_scale=2.5, temperature=0.0, cache=cache)[0], batch[b])


def test_generate_text_equals_full_forward(tt):
    m = micro(tt, "mcq")
    codes = random_codes(m.codec, 2)
    for question in (None, "what is this?"):
        texts = {c: m.generate_text(codes, question, max_new_tokens=6, cache=c) for c in ("fastvq", "static")}
        assert texts["fastvq"] == texts["static"]
        # greedy continuation by repeated full forwards
        tk = m.text_tokenizer
        q = tk.encode(question) if question else []
        for b in range(2):
            seq = [tk.bos_id, tk.boi_id] + [tk.pad_id] * m.codec.num_positions + [tk.eoi_id] + q
            out = []
            for _ in range(6):
                ids = torch.tensor([seq])
                with torch.no_grad():
                    h = m.decoder(m.embed(ids, codes[b:b + 1], torch.tensor([2])), torch.arange(len(seq))[None])
                nxt = int(m.text_head(h[0, -1]).argmax())
                out.append(nxt)
                if nxt == tk.eos_id:
                    break
                seq.append(nxt)
            assert texts["fastvq"][b] == tk.decode(out)


def test_sample_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(4000, 1)
    assert torch.equal(sample_logits(logits, temperature=0.0), torch.full((4000,), 1))
    assert torch.equal(sample_logits(logits, top_k=1, generator=g), torch.full((4000,), 1))
    s = sample_logits(logits, top_k=2, generator=g)
    assert set(s.tolist()) == {1, 3}
    p = logits[0].softmax(-1)   # p(1) = .64, p(3) = .24: top_p .8 keeps {1, 3}
    s = sample_logits(logits, top_p=0.8, generator=g)
    assert set(s.tolist()) == {1, 3}
    frac = (s == 1).float().mean().item()
    assert abs(frac - p[1] / (p[1] + p[3])) < 0.03
    assert set(sample_logits(logits, top_p=0.5, generator=g).tolist()) == {1}
    cold = sample_logits(logits, temperature=0.05, generator=g)
    assert (cold == 1).all()


# ---- losses ----------------------------------------------------------------------------------------------------

def test_loss_masks_and_hand_computation(tt):
    m = micro(tt, "mcq", z_loss_weight=0.5)
    codes = random_codes(m.codec, 3)
    tk = tt
    # t2i: the only text target is eoi, at the last image position; image rows carry no text loss
    b = m.collate(codes, PROMPTS, "t2i")
    L = m.codec.num_positions
    for r in range(3):
        sup = (b["text_targets"][r] != -100).nonzero()[:, 0].tolist()
        assert sup == [int(b["image_start"][r]) + L - 1]
        assert int(b["text_targets"][r, sup[0]]) == tk.eoi_id
    # qa: targets are the answer and eos only (not the image, not the question)
    answers = ["a bag", "a red heart", "an ankle boot"]
    b = m.collate(codes, answers, "qa", questions=["what is this?"] * 3)
    q = len(tk.encode("what is this?"))
    for r in range(3):
        a = tk.encode(answers[r])
        start = 2 + L + 1 + q                      # first answer token
        sup = (b["text_targets"][r] != -100).nonzero()[:, 0].tolist()
        assert sup == list(range(start - 1, start + len(a)))
        assert b["text_targets"][r, sup].tolist() == a + [tk.eos_id]
    assert not b["image_mask"].any()
    with torch.no_grad():
        out = m(b)
        h = m.hidden_states(b)
        sel = b["text_targets"] != -100
        lg = m.text_head(h[sel])
        ce = F.cross_entropy(lg, b["text_targets"][sel])
        z = lg.logsumexp(-1).pow(2).mean()
    torch.testing.assert_close(out["text_loss"], ce)
    torch.testing.assert_close(out["z_loss"], z)
    assert out["image_loss"].item() == 0.0
    torch.testing.assert_close(out["loss"], ce + 0.5 * z)
    # changing masked tokens (the padding after the shorter sequences) does not change the loss
    pad = b["input_ids"].clone()
    short = int(b["lengths"].argmin())
    assert b["lengths"][short] < pad.shape[1]
    pad[short, b["lengths"][short]:] = tk.vocab_size - 1
    with torch.no_grad():
        assert m({**b, "input_ids": pad})["loss"].item() == out["loss"].item()
    # t2i by hand: image CE over every (position, group), text CE on eoi, z over all those logit rows
    b = m.collate(codes, PROMPTS, "t2i")
    with torch.no_grad():
        out = m(b)
        h = m.hidden_states(b)
        img = m.image_logits(b, h)
        ice = torch.stack([F.cross_entropy(img[g].flatten(0, 1), codes[..., g].flatten()) for g in range(3)]).mean()
        sel = b["text_targets"] != -100
        tl = m.text_head(h[sel])
        lse = torch.cat([tl.logsumexp(-1)] + [img[g].logsumexp(-1).flatten() for g in range(3)])
        z = (lse ** 2).sum() / lse.numel()
    torch.testing.assert_close(out["image_loss"], ice)
    torch.testing.assert_close(out["text_loss"], F.cross_entropy(tl, b["text_targets"][sel]))
    torch.testing.assert_close(out["z_loss"], z)
    # the image targets are the codes: changing a code changes the image loss, changing the eoi target does not
    codes2 = codes.clone()
    codes2[0, -1, -1] = (codes2[0, -1, -1] + 1) % 16
    with torch.no_grad():
        assert m(m.collate(codes2, PROMPTS, "t2i"))["image_loss"].item() != out["image_loss"].item()


def test_cfg_dropout_rate_and_seed(tt):
    m = micro(tt, "bits", (8, 32), cfg_dropout=0.3).train()
    B = 3000
    codes = torch.zeros(B, m.codec.num_positions, 2, dtype=torch.long)
    texts = ["a red heart"] * B
    d1 = m.collate(codes, texts, "t2i", generator=torch.Generator().manual_seed(0))["dropped"]
    d2 = m.collate(codes, texts, "t2i", generator=torch.Generator().manual_seed(0))["dropped"]
    assert torch.equal(d1, d2)
    rate = d1.float().mean().item()
    assert abs(rate - 0.3) < 3 * math.sqrt(0.3 * 0.7 / B), rate
    b = m.collate(codes[:4], texts[:4], "t2i", drop_prompt=torch.tensor([True, False, True, False]))
    assert b["lengths"].tolist()[0] == 2 + m.codec.num_positions + 1          # [bos][boi] image [eoi]
    assert b["lengths"].tolist()[1] == 2 + 3 + m.codec.num_positions + 1
    m.eval()
    assert not m.collate(codes, texts, "t2i")["dropped"].any()                # eval: no dropout
    m.train()
    assert not m.collate(codes, texts, "caption")["dropped"].any()            # only t2i prompts drop


def test_one_step_lowers_loss(tt):
    m = micro(tt, "mcq").train()
    codes = random_codes(m.codec, 4)
    b = m.collate(codes, PROMPTS + ["a blue sky"], "t2i", drop_prompt=torch.zeros(4, dtype=torch.bool))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    before = m(b)["loss"]
    before.backward()
    opt.step()
    with torch.no_grad():
        after = m(b)["loss"]
    assert after.item() < before.item() - 1e-3


def test_tiny_preset_on_unitok_codes(tt):
    tok = from_preset("unitok-tiny").eval()
    codec = VisualCodec.from_tokenizer(tok)
    m = MLLM.from_preset("mllm-tiny", text_tokenizer=tt, codec=codec).train()
    codes = codec.encode(tok, torch.rand(8, 3, 64, 64) * 2 - 1)
    assert codes.shape == (8, 16, 4)
    out = m(m.collate(codes, ["a red heart"] * 8, "t2i"))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    m.check_tokenizer(tok)


# ---- checkpoints -----------------------------------------------------------------------------------------------

def test_save_load_round_trip_and_strict_errors(tt, tmp_path):
    from safetensors.torch import load_file, save_file
    m = micro(tt, "bits", (8, 32))
    m.save_pretrained(tmp_path / "m")
    n = MLLM.from_pretrained(tmp_path / "m")
    assert n.config == m.config and n.text_tokenizer == m.text_tokenizer
    for (k, a), (k2, b) in zip(m.state_dict().items(), n.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert torch.equal(m.generate_images(PROMPTS, temperature=0.0), n.generate_images(PROMPTS, temperature=0.0))
    state = load_file(str(tmp_path / "m" / WEIGHTS_NAME))
    state["extra.weight"] = torch.zeros(1)
    del state["text_head.weight"]
    save_file(state, str(tmp_path / "m" / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"MLLM.from_pretrained: .*missing keys \['text_head.weight'\], "
                                         r"unexpected keys \['extra.weight'\]"):
        MLLM.from_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    meta["config"]["bogus"] = 1
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"unknown MLLMConfig fields \['bogus'\]"):
        MLLM.from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="MLLM.from_pretrained: .* does not exist"):
        MLLM.from_pretrained(tmp_path / "nothing")


def test_text_tokenizer(tt, tmp_path):
    ids = tt.encode("A photo of a zebra")
    assert ids[:3] == [tt._ids["a"], tt._ids["photo"], tt._ids["of"]]
    assert tt.unk_id in ids                                     # "zebra" pieces are not in the corpus
    assert tt.decode(tt.encode("A small T-shirt")) == "a small t - shirt"
    assert tt.decode([tt.bos_id, tt._ids["red"], tt.eos_id]) == "red"
    assert (tt.pad_id, tt.unk_id, tt.bos_id, tt.eos_id, tt.boi_id, tt.eoi_id) == (0, 1, 2, 3, 4, 5)
    tt.save(tmp_path)
    assert TextTokenizer.load(tmp_path) == tt
    small = TextTokenizer.from_corpus(CORPUS, min_count=2)
    assert set(small.pieces[6:]) == {"a", "of", "an", "photo", "image", "."}
    assert TextTokenizer.from_corpus(CORPUS, max_size=8).vocab_size == 8
    with pytest.raises(ValueError, match=r"TextTokenizer.decode: id 999 is outside"):
        tt.decode([999])
    with pytest.raises(ValueError, match="TextTokenizer.from_corpus: texts must be a list of str"):
        TextTokenizer.from_corpus("a red heart")


# ---- visual codecs ---------------------------------------------------------------------------------------------

def test_codecs_of_the_tokenizers():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    tok = from_preset("mergevq-tiny").eval()
    codec = VisualCodec.from_tokenizer(tok)
    assert (codec.kind, codec.group_sizes, codec.grid, codec.bits_split) == ("bits", (64, 4096), (8, 8), (6, 12))
    codes, extras = codec.encode_with_extras(tok, x)
    out = tok.encode(x)
    full = out.indices.gather(1, out.extras["source"])
    assert torch.equal(codes[..., 0] + 64 * codes[..., 1], full)             # low 6 bits first
    with torch.no_grad():
        torch.testing.assert_close(codec.decode(tok, codes, extras), tok.decode_indices(out.indices, out.extras))
        assert codec.decode(tok, codes).shape == (2, 3, 32, 32)
    assert VisualCodec.from_dict(codec.to_dict()) == codec
    json.dumps(codec.to_dict())
    u = VisualCodec.from_tokenizer(from_preset("unitok-tiny"))
    assert (u.kind, u.group_sizes, u.grid) == ("mcq", (256,) * 4, (4, 4))
    w = VisualCodec.from_tokenizer(from_preset("uniwetok-tiny"))
    assert (w.kind, w.group_sizes, w.grid) == ("bits", (256,) * 16, (4, 4))
    v = VisualCodec.from_tokenizer(from_preset("vqgan-tiny"))
    assert (v.kind, v.group_sizes, v.grid) == ("mcq", (1024,), (4, 4))


# ---- the Hugging Face backbone ---------------------------------------------------------------------------------

def test_hf_backbone_matches_transformers(tt):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(vocab_size=tt.vocab_size, hidden_size=64, intermediate_size=160,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, rms_norm_eps=1e-6)
    torch.manual_seed(3)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    codec = VisualCodec("mcq", (16, 16), (2, 2), tokenizer="synthetic")
    m = MLLM.from_hf_backbone(hf, codec=codec, text_tokenizer=tt, depth_layers=1, code_dim=16, max_text_len=8).eval()
    assert m.config.dim == 64 and m.config.num_kv_heads == 2 and m.config.max_seq_len == 64
    assert torch.equal(m.text_embed.weight, hf.model.embed_tokens.weight)
    b = m.collate(random_codes(codec, 2), ["a red heart", "a bag"], "t2i")
    with torch.no_grad():
        h = m.embed(b["input_ids"], b["codes"], b["image_start"])
        ours = m.decoder(h, b["positions"])
        theirs = hf.model(inputs_embeds=h, position_ids=b["positions"]).last_hidden_state
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        # the text logits of HF's own head on its own embeddings equal ours on text positions
        ids = b["input_ids"][:, :4]
        torch.testing.assert_close(m.text_head(m.decoder(m.text_embed(ids), b["positions"][:, :4])),
                                   hf(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert m.generate_images(["a red heart"], temperature=0.0).shape == (1, 4, 2)


# ---- bad input -------------------------------------------------------------------------------------------------

def test_bad_input_errors(tt):
    m = micro(tt, "mcq")
    with pytest.raises(ValueError, match=r"MLLM.generate_images: prompts\[1\] is empty"):
        m.generate_images(["a red heart", "   "])
    with pytest.raises(ValueError, match=r"MLLM.generate_images: prompts must be a non-empty list of str"):
        m.generate_images("a red heart")
    long = " ".join(["red"] * 13)
    with pytest.raises(ValueError, match=r"MLLM.generate_images: prompts\[0\] has 13 text tokens, more than "
                                         r"max_text_len 12 \(the context holds 34 positions\)"):
        m.generate_images([long])
    with pytest.raises(ValueError, match=r"MLLM.generate_images: temperature must be >= 0"):
        m.generate_images(["a bag"], temperature=-1)
    with pytest.raises(ValueError, match=r"MLLM.generate_images: cache must be 'fastvq' or 'static'"):
        m.generate_images(["a bag"], cache="paged")
    codes = random_codes(m.codec, 2)
    bad = codes.clone()
    bad[1, 2, 0] = 16
    with pytest.raises(ValueError, match=r"MLLM.collate: codes\[1, 2, 0\] = 16 is outside \[0, 16\) \(an unknown code\)"):
        m.collate(bad, ["a", "b"], "t2i")
    with pytest.raises(ValueError, match=r"MLLM.generate_text: codes must be int64 \[B, L=6, G=3\], got torch.int64 "
                                         r"\[2, 6, 2\]"):
        m.generate_text(codes[..., :2])
    with pytest.raises(ValueError, match=r"MLLM.collate: task must be 't2i', 'caption' or 'qa', got 'vqa'"):
        m.collate(codes, ["a", "b"], "vqa")
    with pytest.raises(ValueError, match=r"MLLM.collate: task 'qa' needs questions"):
        m.collate(codes, ["a", "b"], "qa")
    with pytest.raises(ValueError, match=r"MLLM.collate: texts\[1\] is empty"):
        m.collate(codes, ["a", ""], "caption")
    # a tokenizer checkpoint that does not match the MLLM
    tok = from_preset("unitok-tiny")
    m2 = MLLM.from_preset("mllm-tiny", text_tokenizer=tt, codec=VisualCodec.from_tokenizer(tok))
    m2.check_tokenizer(tok)
    other = from_preset("unitok-tiny", codebook_size=128)
    with pytest.raises(ValueError, match=r"MLLM.check_tokenizer: the tokenizer does not match .*group_sizes "
                                         r"\(256, 256, 256, 256\) \(model\) != \(128, 128, 128, 128\) \(tokenizer\)"):
        m2.check_tokenizer(other)
    with pytest.raises(ValueError, match=r"MLLM.check_tokenizer: .*tokenizer 'unitok' \(model\) != 'vqgan'"):
        m2.check_tokenizer(from_preset("vqgan-tiny"))
    with pytest.raises(ValueError, match=r"MLLM.attach_text_tokenizer: the tokenizer has 8 ids, the model "
                                         rf"text_vocab_size {tt.vocab_size}"):
        m.attach_text_tokenizer(TextTokenizer.from_corpus(CORPUS, max_size=8))
    with pytest.raises(ValueError, match=r"MLLMConfig: max_seq_len 20 cannot hold L \+ 2·max_text_len \+ 4 = 34"):
        MLLMConfig(text_vocab_size=tt.vocab_size, codec=m.codec.to_dict(), max_text_len=12, max_seq_len=20)
    with pytest.raises(ValueError, match=r"VisualCodec: kind must be 'mcq' or 'bits', got 'fsq'"):
        VisualCodec("fsq", (8,), (2, 2))
