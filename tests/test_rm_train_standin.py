"""A small stand-in for the reference model's API (README "Model") and data, so the training
pipeline's plumbing is tested on its own; plus unit tests of config, schedules and sampler.

The stand-in follows the contract: create_vit(name, ops=...) with patch_embed.patch_size /
tubelet_size, blocks and set_step; MAEModel(vit)(x) -> (loss, pred, mask); HashtagModel(vit,
num_tags)(x) -> logits and .loss; CLIPModel(vit, text)(x, captions) -> (img, txt, scale), .loss.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reference_model.train import config as C  # noqa: E402
from reference_model.train import sampler as S  # noqa: E402
from reference_model.train import schedule as SC  # noqa: E402
from reference_model.train.tasks import ModelAPI  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine OpenMP's
    barriers under oversubscription make a two-thread step ~50x slower than one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------
# stand-in model
# ----------------------------------------------------------------------------------------------
class _PatchEmbed(nn.Module):
    def __init__(self, dim, patch=4, tubelet=2):
        super().__init__()
        self.patch_size, self.tubelet_size = patch, tubelet
        self.proj = nn.Conv3d(3, dim, (tubelet, patch, patch), (tubelet, patch, patch))

    def forward(self, x):
        if x.dim() == 4:
            y = F.conv2d(x, self.proj.weight.sum(2), self.proj.bias, stride=self.patch_size)
            return y.flatten(2).transpose(1, 2)
        return self.proj(x).flatten(2).transpose(1, 2)


class _Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        # no key bias: its gradient is zero in exact arithmetic (softmax shift), and Adam turns
        # the rounding noise there into whole steps, which would defeat exact comparisons
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True, bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class StandInViT(nn.Module):
    def __init__(self, dim=32, depth=2, ops="xray"):
        super().__init__()
        self.ops, self.embed_dim, self.step = ops, dim, 0
        self.patch_embed = _PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_scale = nn.Parameter(torch.ones(dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def set_step(self, step):
        self.step = step

    def forward_features(self, x):
        t = self.patch_embed(x)
        pos = torch.sin(torch.arange(t.shape[1], dtype=t.dtype)[:, None] * self.pos_scale)
        t = torch.cat([self.cls_token.expand(len(t), -1, -1), t + pos], 1)
        for b in self.blocks:
            t = b(t)
        return self.norm(t)

    def forward(self, x):
        return self.forward_features(x)[:, 0]


def standin_vit(name, *, ops="xray", **overrides):
    return StandInViT(dim=overrides.get("dim", 32), depth=overrides.get("depth", 2), ops=ops)


class StandInMAE(nn.Module):
    def __init__(self, vit, mask_ratio=0.5):
        super().__init__()
        self.vit, self.mask_ratio = vit, mask_ratio
        self.decoder = nn.Linear(vit.embed_dim, 3 * 4 * 4)

    def forward(self, x):
        if x.dim() == 5:
            x = x[:, :, 0]
        p = self.vit.patch_embed.patch_size
        target = F.unfold(x, p, stride=p).transpose(1, 2)  # (B, L, 3 p p)
        mask = (torch.rand(target.shape[:2]) < self.mask_ratio).float()
        tokens = self.vit.forward_features(x * 1.0)[:, 1:]
        pred = self.decoder(tokens)
        loss = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum().clamp(min=1)
        return loss, pred, mask


class StandInHashtag(nn.Module):
    loss_kind = "softmax"

    def __init__(self, vit, num_tags):
        super().__init__()
        self.vit = vit
        self.head = nn.Linear(vit.embed_dim, num_tags)

    def forward(self, x):
        return self.head(self.vit(x))

    def loss(self, logits, targets):
        t = targets / targets.sum(-1, keepdim=True).clamp(min=1)
        return -(t * F.log_softmax(logits, -1)).sum(-1).mean()


class StandInText(nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.emb = nn.EmbeddingBag(257, dim)

    def forward(self, captions):
        ids = [torch.tensor([b for b in c.encode()[:24]] or [0]) for c in captions]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        return self.emb(torch.cat(ids), offsets)


class StandInCLIP(nn.Module):
    siamese_weight = 0.5

    def __init__(self, vit, text, embed_dim=16):
        super().__init__()
        self.vit, self.text, self.embed_dim = vit, text, embed_dim
        self.img_proj = nn.Linear(vit.embed_dim, embed_dim, bias=False)
        self.txt_proj = nn.Linear(32, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def encode_image(self, x):
        return F.normalize(self.img_proj(self.vit(x)), dim=-1)

    def encode_text(self, captions):
        return F.normalize(self.txt_proj(self.text(captions)), dim=-1)

    def forward(self, x, captions):
        return self.encode_image(x), self.encode_text(captions), self.logit_scale.exp()

    def loss(self, img, txt, scale, txt2=None):
        labels = torch.arange(len(img))
        logits = scale * img @ txt.T
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        if txt2 is not None:
            loss = loss + self.siamese_weight * (1 - (txt * txt2).sum(-1)).mean()
        return loss


def standin_text(kind, *, model, ops, **overrides):
    return StandInText()


STANDIN_API = ModelAPI(create_vit=standin_vit, mae=StandInMAE, hashtag=StandInHashtag,
                       clip=StandInCLIP, text_tower=standin_text)


# ----------------------------------------------------------------------------------------------
# stand-in data: coloured squares, captions and hashtags from the colour and position
# ----------------------------------------------------------------------------------------------
COLOURS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0)}


class StandInData(torch.utils.data.Dataset):
    classes = list(COLOURS)
    prompts = ["a {} square."]

    def __init__(self, n=64, size=16, frames=0):
        self.n, self.size, self.frames = n, size, frames
        self.kind = "video" if frames else "image"

    def __len__(self):
        return self.n

    def meta(self, i):
        c = list(COLOURS)[i % 4]
        side = "left" if (i // 4) % 2 else "right"
        return {"caption": f"a {c} square on the {side}", "caption2": f"{c} {side}",
                "hashtags": [c, side], "label": i % 4, "index": i}

    def hashtag_lists(self):
        return [self.meta(i)["hashtags"] for i in range(self.n)]

    def __getitem__(self, i):
        m = self.meta(i)
        img = torch.rand(3, self.size, self.size) * 0.2  # augmentation noise: the item RNG
        h = self.size // 2
        col = torch.tensor(COLOURS[list(COLOURS)[i % 4]], dtype=torch.float32)[:, None, None]
        if m["hashtags"][1] == "left":
            img[:, :, :h] = col
        else:
            img[:, :, h:] = col
        if self.frames:
            m["video"] = img[:, None].repeat(1, self.frames, 1, 1)
        else:
            m["image"] = img
        return m


def standin_sources(n=64, size=16, video=True):
    return {"image": StandInData(n, size), "video": StandInData(n // 2, size, 4) if video else None}


def tiny_config(out, **kw) -> C.TrainConfig:
    """A TrainConfig for the stand-in: 8 px then 16 px, batch 8, a few steps per stage."""
    cfg = C.load_config("tiny")
    cfg.out = str(out)
    cfg.device = "cpu"
    cfg.log_every = 2
    for s in C.STAGES:
        sc = cfg.stage_config(s)
        sc.steps, sc.batch_size, sc.video_every = 6, 8, 3
        sc.phases = [C.Phase(0.0, 8, 2), C.Phase(0.5, 16, 4)]
    for k, v in kw.items():
        C.set_key(cfg, k, v)
    return cfg


# ----------------------------------------------------------------------------------------------
# unit tests of the pieces
# ----------------------------------------------------------------------------------------------
def test_config_overrides_and_errors(tmp_path):
    cfg = C.load_config("tiny", ["mae.steps=7", "optimizer=adamw", "clip.phases=[[0, 16, 2]]",
                                 "model_overrides.depth=2", "distill.weight=0.5"])
    assert cfg.mae.steps == 7 and cfg.optimizer == "adamw"
    assert cfg.clip.phases == [C.Phase(0, 16, 2)] and cfg.model_overrides == {"depth": 2}
    assert cfg.distill.weight == 0.5
    y = tmp_path / "run.yaml"
    y.write_text("model: tiny\nseed: 3\nhashtag:\n  lr: 0.001\n  model: {max_tags: 10}\n")
    cfg = C.load_config(str(y))
    assert cfg.seed == 3 and cfg.hashtag.lr == 0.001 and cfg.hashtag.model == {"max_tags": 10}
    with pytest.raises(C.ConfigError, match="mae.stepz"):
        C.load_config("tiny", ["mae.stepz=3"])
    with pytest.raises(C.ConfigError, match="mae.steps: expected an integer"):
        C.load_config("tiny", ["mae.steps=abc"])
    with pytest.raises(C.ConfigError, match="nope.yaml"):
        C.load_config("nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\n  seed: [\n")
    with pytest.raises(C.ConfigError, match="bad.yaml: cannot read"):
        C.load_config(str(bad))
    cfg = C.load_config("tiny", ["clip.phases=[[0.5, 16, 2]]"])
    with pytest.raises(C.ConfigError, match="clip.phases"):
        C.validate(cfg)


def test_cosine_warmup_schedule():
    f = [SC.cosine_warmup(s, 100, 0.1, 0.0) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] < 0.01
    assert SC.cosine_warmup(99, 100, 5, 0.2) == pytest.approx(0.2, abs=1e-3)


def test_resolution_schedule_keeps_tokens_times_batch_flat():
    phases = [C.Phase(0.0, 16, 2), C.Phase(0.5, 32, 4)]
    r = SC.ResolutionSchedule(phases, 10, 64, patch_size=4, tubelet=2, divisor=2, video_every=4)
    p0, p5 = r.plan(0), r.plan(5)
    assert (p0.img_size, p0.tokens, p0.batch_size) == (16, 17, 64)
    assert (p5.img_size, p5.tokens) == (32, 65) and p5.batch_size == 64 * 17 // 65 // 2 * 2
    v = r.plan(3)
    assert v.video and v.clip_len == 2 and v.tokens == 16 * 1 + 1
    v7 = r.plan(7)
    assert v7.video and v7.clip_len == 4 and v7.tokens == 64 * 2 + 1
    for p in (p0, p5, v, v7):  # memory proxy within one batch quantum of the budget
        assert p.batch_size * p.tokens <= 64 * 17
        assert (p.batch_size + 2) * p.tokens > 64 * 17
    assert SC.steps_for_epochs(1.0, 640, lambda n: SC.ResolutionSchedule(
        [C.Phase(0.0, 16, 2)], n, 64, patch_size=4)) == 10


def test_index_stream_positions_and_sharding():
    st = S.IndexStream(10, seed=0)
    a = [i for _, i in st.take(0, 25)]
    assert sorted(a[:10]) == list(range(10)) and sorted(a[10:20]) == list(range(10))
    assert [i for _, i in S.IndexStream(10, 0).take(13, 5)] == a[13:18]  # resume at 13
    seeds = [s for s, _ in st.take(0, 25)]
    assert len(set(seeds)) == 25
    # two ranks x two micro-batches cover the global batch exactly once, rank-contiguous
    got = []
    for rank in range(2):
        mb = S.MicroBatches(S.IndexStream(10, 0), iter([0, 1]), lambda s: 8, 0, rank, 2, 2)
        got.append([k for m in mb for k in m])
    keys0, keys1 = got
    allk = st.take(0, 16)
    assert keys0 == allk[0:4] + allk[8:12] and keys1 == allk[4:8] + allk[12:16]


def test_seeded_items_do_not_touch_the_callers_rng():
    ds = S.SeededItems(StandInData(8))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a = ds[(123, 3)]["image"]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(ds[(123, 3)]["image"], a) and not torch.equal(ds[(124, 3)]["image"], a)


def test_loader_batches_do_not_depend_on_workers_or_a_restart():
    """Two DataLoader workers fetch the same micro-batches as none (items seeded by position),
    and a loader started at a data position continues the stream exactly."""
    ds = StandInData(40)

    def batches(workers, steps, position=0):
        it = S.make_loader(ds, S.IndexStream(len(ds), 3), iter(steps), lambda s: 6, position,
                           rank=0, world=1, accum=2, num_workers=workers, seed=3)
        return [b["image"] for b in it]

    ref = batches(0, range(5))
    assert len(ref) == 10 and ref[0].shape == (3, 3, 16, 16)
    for a, b in zip(ref, batches(2, range(5))):
        assert torch.equal(a, b)
    for a, b in zip(ref[4:], batches(0, range(2, 5), position=12)):
        assert torch.equal(a, b)
