"""LLM2CLIP-style text tower: the frozen all-MiniLM-L6-v2 encoder (offline), its on-disk
caption-embedding cache, the trainable adapter, and caption-contrastive fine-tuning."""

import copy
import os

import pytest
import torch

from reference_model import AdapterTextTower, CLIPModel, FrozenTextEncoder, create_vit
from reference_model.text import caption_contrastive_finetune, default_text_encoder_path

CAPS = ["a small red star left of a blue circle", "a little crimson star beside a blue ring",
        "quarterly earnings of the bank fell sharply"]


@pytest.fixture(scope="module")
def offline():
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def encoder(offline, tmp_path_factory):
    return FrozenTextEncoder(cache_dir=tmp_path_factory.mktemp("text-cache"))


def test_frozen_encoder_matches_sentence_transformers(encoder):
    emb = encoder.embed(CAPS)
    assert emb.shape == (3, 384) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    # the packaged model's own pipeline (Transformer -> mean pooling -> Normalize)
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(default_text_encoder_path()), device="cpu")
    want = torch.as_tensor(ref.encode(CAPS))
    torch.testing.assert_close(emb, want, rtol=1e-4, atol=1e-5)
    # a real pretrained encoder: the paraphrase is nearer than the unrelated sentence
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2


def test_cache_computes_each_caption_once_and_persists(encoder, monkeypatch):
    first = encoder.embed(CAPS[:2])
    folder = encoder.cache.folder
    assert folder is not None and list(folder.glob("part-*.safetensors"))

    def boom(*a, **k):
        raise AssertionError("encoder ran for a cached caption")

    monkeypatch.setattr(encoder, "encode", boom)
    torch.testing.assert_close(encoder.embed(CAPS[:2][::-1]), first.flip(0))
    monkeypatch.undo()
    # a new encoder on the same cache folder reads the rows from disk
    again = FrozenTextEncoder(cache_dir=folder.parent)
    assert again.cache.folder == folder and len(again.cache) >= 2
    monkeypatch.setattr(again, "encode", boom)
    torch.testing.assert_close(again.embed(CAPS[:2]), first)
    monkeypatch.undo()
    # a new caption is encoded and appended as a new shard
    n = len(list(folder.glob("part-*.safetensors")))
    again.embed(["an orange hexagon"])
    assert len(list(folder.glob("part-*.safetensors"))) == n + 1


def test_adapter_tower_trains_only_the_adapter(encoder):
    tower = AdapterTextTower(encoder, output_dim=16)
    assert not any(k.startswith("encoder") for k in tower.state_dict())
    twin = copy.deepcopy(tower)   # e.g. the evaluation's int8 copy: the frozen encoder is shared
    assert twin.encoder is encoder and twin.fc1.weight is not tower.fc1.weight
    out = tower(CAPS)
    assert out.shape == (3, 16)
    vit = create_vit("tiny", embed_dim=32, depth=1, num_heads=2, patch_size=4, img_size=16,
                     embed_dim_clip=8)
    model = CLIPModel(vit, tower)
    img, txt, scale = model(torch.rand(3, 3, 16, 16), CAPS)
    model.loss(img, txt, scale).backward()
    assert tower.fc1.weight.grad is not None and tower.skip.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in encoder.model.parameters())


def test_caption_contrastive_finetune(offline, tmp_path):
    enc = FrozenTextEncoder(cache_dir=tmp_path)
    before = enc.embed(CAPS).clone()
    fp = enc._fingerprint
    w0 = enc.model.encoder.layer[0].attention.self.query.weight.clone()
    e0 = enc.model.embeddings.word_embeddings.weight.clone()
    losses = caption_contrastive_finetune(enc, CAPS[:2] + ["a green square"],
                                          CAPS[1:2] + CAPS[:1] + ["one green box"],
                                          steps=1, batch_size=3, lr=1e-4)
    assert len(losses) == 1 and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(enc.model.encoder.layer[0].attention.self.query.weight, w0)
    assert torch.equal(enc.model.embeddings.word_embeddings.weight, e0)   # tables stay frozen
    assert enc._fingerprint != fp and len(enc.cache) == 0       # re-keyed: no stale rows
    assert not any(p.requires_grad for p in enc.model.parameters())
    assert (enc.embed(CAPS) - before).abs().max() > 1e-6
    with pytest.raises(ValueError, match="captions2"):
        caption_contrastive_finetune(enc, CAPS, CAPS[:2], steps=1)


def test_bad_encoder_path_and_captions(offline, tmp_path, encoder):
    with pytest.raises(ValueError, match="model_path"):
        FrozenTextEncoder(tmp_path / "nope")
    with pytest.raises(TypeError, match="captions"):
        encoder.embed("one string")
    with pytest.raises(ValueError, match="captions"):
        encoder.embed([])
