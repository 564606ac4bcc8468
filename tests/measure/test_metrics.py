"""PS / IS / KPS: hand-computed values, the clamping rule, and ClipScorer on a tiny random open_clip model."""
import json
import math

import open_clip
import pytest
import torch
from PIL import Image

from cat_train.measure import metrics as M


def unit_pairs(cosines):
    """Row pairs (a_i, b_i) in 2-D with cos(a_i, b_i) = cosines[i] (b is not normalized on purpose)."""
    c = torch.tensor(cosines, dtype=torch.float64)
    a = torch.tensor([[1.0, 0.0]]).double().expand(len(c), 2)
    b = torch.stack([c, torch.sqrt(1 - c * c)], 1) * 3.0
    return a, b


def test_harmonic_mean_by_hand():
    a, b = unit_pairs([0.5, 1.0, 0.25])
    s = M.cosine(a, b)
    assert s.tolist() == pytest.approx([0.5, 1.0, 0.25], abs=1e-15)
    h, clamped = M.harmonic_mean(s)
    assert h == pytest.approx(3 / 7, abs=1e-14) and clamped == 0  # 3 / (2 + 1 + 4)
    score = M.kps(a, b)
    assert score.value == pytest.approx(4 / 7, abs=1e-14) and score.n == 3 and score.clamped == 0
    assert M.prompt_similarity(a, b).value == pytest.approx(3 / 7, abs=1e-14)


def test_identical_sets_give_kps_exactly_zero():
    torch.manual_seed(0)
    e = torch.randn(8, 32) * torch.rand(8, 1) * 5  # unnormalized, varied norms
    score = M.kps(e, e.clone())
    assert score.value == 0.0 and score.clamped == 0 and bool((score.per_pair == 1.0).all())


def test_non_positive_similarities_are_clamped_and_counted():
    a = torch.eye(4)
    orth = M.kps(a, a.roll(1, 0))  # every pair orthogonal
    assert orth.clamped == 4 and orth.value == pytest.approx(1 - M.FLOOR, abs=1e-15)
    mixed = M.kps(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))  # cos 1 and -1
    assert mixed.clamped == 1 and mixed.value == pytest.approx(1 - 2 / (1 + 1 / M.FLOOR), abs=1e-15)
    assert mixed.per_pair.tolist() == [1.0, -1.0]  # the raw similarities, unclamped
    h, n = M.harmonic_mean(torch.tensor([0.5, 1e-7]), floor=1e-3)
    assert n == 1 and h == pytest.approx(2 / (2 + 1e3))


def test_input_errors():
    with pytest.raises(ValueError, match="no values"):
        M.harmonic_mean(torch.tensor([]))
    with pytest.raises(ValueError, match="NaN"):
        M.harmonic_mean(torch.tensor([0.5, float("nan")]))
    with pytest.raises(ValueError, match="same seeds"):
        M.kps(torch.ones(3, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="all zeros"):
        M.cosine(torch.zeros(1, 4), torch.ones(1, 4))


def test_identity_pairs_every_reference_when_counts_differ():
    refs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    gens = torch.tensor([[1.0, 1.0], [1.0, 0.0], [3.0, 4.0]])
    s = M.identity_similarity(refs, gens)
    r2 = 1 / math.sqrt(2)
    expected = [r2, r2, 1.0, 0.0, 0.6, 0.8]  # gen-major: (g0,r0), (g0,r1), (g1,r0), ...
    assert s.per_pair.tolist() == pytest.approx(expected, abs=1e-15) and s.clamped == 1
    clamped = [max(x, M.FLOOR) for x in expected]
    assert s.value == pytest.approx(6 / sum(1 / x for x in clamped), rel=1e-12)
    same = M.identity_similarity(gens[:2] * 2, gens[:2])  # equal counts: i with i
    assert same.per_pair.tolist() == pytest.approx([1.0, 1.0], abs=1e-15)


def test_single_prompt_row_is_shared():
    t = torch.tensor([[1.0, 0.0]])
    imgs = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    s = M.prompt_similarity(t, imgs)
    assert s.per_pair.tolist() == pytest.approx([1.0, 1 / math.sqrt(2)], abs=1e-15)


# --- ClipScorer on a tiny random open_clip model -------------------------------------------------------------

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("oc")
    (d / "cat-test-tiny-clip.json").write_text(json.dumps(TINY))
    wide = json.loads(json.dumps(TINY))
    wide["vision_cfg"]["width"] = 96
    (d / "cat-test-tiny-clip-wide.json").write_text(json.dumps(wide))
    hf = json.loads(json.dumps(TINY))
    hf["text_cfg"]["hf_tokenizer_name"] = "someone/tokenizer"
    (d / "cat-test-tiny-clip-hf.json").write_text(json.dumps(hf))
    open_clip.add_model_config(d)
    torch.manual_seed(0)
    model = open_clip.create_model("cat-test-tiny-clip")
    ckpt = d / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    return ckpt


@pytest.fixture
def no_network(monkeypatch):
    import huggingface_hub

    def refuse(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", refuse)
    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


def images(seed, n, size=40):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy(),
                            "RGB") for _ in range(n)]


def test_clip_scorer_embeddings(tiny_clip, no_network):
    scorer = M.ClipScorer("cat-test-tiny-clip", tiny_clip, batch_size=2)
    assert isinstance(scorer.tokenizer, open_clip.tokenizer.SimpleTokenizer)  # bundled BPE, no download
    imgs = images(1, 5)
    e = scorer.embed_images(imgs)
    assert e.shape == (5, 32) and torch.allclose(e.norm(dim=-1), torch.ones(5), atol=1e-6)
    assert torch.allclose(M.ClipScorer("cat-test-tiny-clip", tiny_clip, batch_size=32).embed_images(imgs), e, atol=1e-6)
    t = scorer.embed_texts(["a photo of sks dog", "a dog", "a cat"])
    assert t.shape == (3, 32) and torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert (t[0] - t[1]).abs().max() > 1e-3
    as_tensor = torch.from_numpy(__import__("numpy").array(imgs[0])).float() / 255  # ComfyUI (H, W, 3) layout
    assert torch.allclose(scorer.embed_images([as_tensor, as_tensor.permute(2, 0, 1)]), e[:1].expand(2, -1), atol=1e-6)


def test_clip_scorer_evaluate_matches_hand_computation(tiny_clip, no_network):
    scorer = M.ClipScorer("cat-test-tiny-clip", tiny_clip, batch_size=3)
    tok, notok, refs = images(2, 4), images(3, 4), images(4, 2)
    prompts = ["a photo of sks dog"] * 4
    out = scorer.evaluate(tok, notok, refs, prompts)
    et, en, er = scorer.embed_images(tok), scorer.embed_images(notok), scorer.embed_images(refs)
    ep = scorer.embed_texts(prompts)

    def hand(a, b):  # S_C per pair, then H with the floor
        s = [float(x @ y / (x.norm() * y.norm())) for x, y in zip(a.double(), b.double())]
        return len(s) / sum(1 / max(v, M.FLOOR) for v in s), s

    kps_h, kps_s = hand(en, et)
    ps_h, _ = hand(ep, et)
    is_h, _ = hand(er.repeat(4, 1), et.repeat_interleave(2, 0))  # 2 references x 4 images: all 8 pairs
    assert out["n"] == 4 and out["kps"] == pytest.approx(1 - kps_h, abs=1e-6)
    assert out["ps"] == pytest.approx(ps_h, abs=1e-6) and out["is"] == pytest.approx(is_h, abs=1e-6)
    assert out["per_pair"]["kps"] == pytest.approx(kps_s, abs=1e-6) and len(out["per_pair"]["is"]) == 8
    assert set(out["clamped"]) == {"kps", "is", "ps"}
    same = scorer.evaluate(tok, tok)
    assert same["kps"] == 0.0 and same["is"] is None and same["ps"] is None


def test_clip_scorer_errors(tiny_clip, tmp_path, no_network):
    with pytest.raises(FileNotFoundError, match="missing.pt.*put the open_clip weights"):
        M.ClipScorer("ViT-L-14", tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Q-99'.*ViT-B-32"):
        M.ClipScorer("ViT-Q-99", tiny_clip)
    with pytest.raises(ValueError, match="tiny.pt does not fit open_clip model 'cat-test-tiny-clip-wide'"):
        M.ClipScorer("cat-test-tiny-clip-wide", tiny_clip)
    with pytest.raises(ValueError, match="Hugging Face tokenizer"):
        M.ClipScorer("cat-test-tiny-clip-hf", tiny_clip)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="junk.pt"):
        M.ClipScorer("cat-test-tiny-clip", junk)


def test_builtin_clip_tokenizer_is_bundled(no_network):
    tok = open_clip.get_tokenizer("ViT-L-14")
    assert isinstance(tok, open_clip.tokenizer.SimpleTokenizer)
    ids = tok(["a photo of sks dog"])
    assert ids.shape == (1, 77) and int(ids[0, 0]) == 49406  # <start_of_text>


def test_scores_from_embeddings_by_hand_and_missing_inputs():
    a, b = unit_pairs([0.5, 1.0, 0.25])
    out = M.scores_from_embeddings(b, notok=a, ref=a, text=a[:1])
    assert out["kps"] == pytest.approx(4 / 7, abs=1e-14) and out["is"] == pytest.approx(3 / 7, abs=1e-14)
    assert out["ps"] == pytest.approx(3 / 7, abs=1e-14) and out["n"] == 3
    assert out["clamped"] == {"kps": 0, "is": 0, "ps": 0}
    only = M.scores_from_embeddings(b, ref=a)
    assert only["kps"] is None and only["ps"] is None and set(only["per_pair"]) == {"is"}
    with pytest.raises(ValueError, match="embed_texts"):
        M.score_images(lambda imgs: b, [0, 1, 2], prompts=["x"])


def test_any_image_encoder_gives_the_open_clip_path_s_is_and_kps_for_the_same_embeddings(tiny_clip, no_network):
    """A CLIP vision model returns raw image_embeds (not normalized): same directions must score the same."""
    scorer = M.ClipScorer("cat-test-tiny-clip", tiny_clip, batch_size=3)
    tok, notok, refs = images(5, 4), images(6, 4), images(7, 3)
    table = {id(im): e for ims in (tok, notok, refs) for im, e in zip(ims, scorer.embed_images(ims))}

    def same(imgs):  # another encoder that produces the open_clip embeddings
        return torch.stack([table[id(im)] for im in imgs])

    def raw(imgs):  # ... and one that returns them unnormalized, each row at its own scale
        e = same(imgs).double()  # scaled in float64, so the only difference left is the scale
        return e * torch.linspace(0.5, 7.3, len(e), dtype=torch.float64)[:, None]

    ref = scorer.evaluate(tok, notok, refs)
    via = M.score_images(same, tok, notok, refs)
    assert via == ref  # identical embeddings: identical numbers, bit for bit, through either entry point
    scaled = M.score_images(raw, tok, notok, refs)
    assert scaled["is"] == pytest.approx(ref["is"], abs=1e-12) and scaled["kps"] == pytest.approx(ref["kps"], abs=1e-12)
    assert 0 < ref["is"] < 1 and 0 < ref["kps"] < 1
