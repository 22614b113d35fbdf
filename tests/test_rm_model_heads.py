"""Heads, losses and stage models: MAE's masking and loss, hashtag losses, CLIP and caption
siamese losses, distillation losses, each on a tiny batch against a hand computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from reference_model import (CLIPModel, CLIPTextTransformer, HashtagModel, MAEModel, Normalize,
                             create_vit, patchify)
from reference_model import losses

SMALL = dict(embed_dim=32, depth=2, num_heads=2, patch_size=4, img_size=16, num_frames=4,
             decoder_dim=16, decoder_depth=1, decoder_heads=2, embed_dim_clip=24,
             text_width=32, text_depth=1, text_heads=2, context_length=12)


def small_vit(ops="xray"):
    return create_vit("tiny", ops=ops, **SMALL)


# ---------------------------------------------------------------------------------- MAE
def test_masking_ratio_per_sample_independence():
    vit = small_vit()
    x = torch.rand(6, 3, 16, 16)
    out = vit.forward_masked(x, 0.75)
    L = 16
    keep = int(L * 0.25)
    assert out.mask.shape == (6, L)
    assert set(out.mask.unique().tolist()) == {0.0, 1.0}
    assert (out.mask.sum(1) == L - keep).all()                 # the ratio, in every sample
    assert out.tokens.shape == (6, 1 + keep, 32)
    assert len({tuple(m.tolist()) for m in out.mask}) == 6     # each sample its own mask
    # ids_restore inverts the shuffle: the kept positions are where the mask is 0
    assert torch.equal(out.ids_restore.argsort(1)[:, :keep].sort(1).values,
                       (out.mask == 0).nonzero()[:, 1].view(6, keep))


def test_encoder_sees_only_visible_tokens():
    vit = small_vit().eval()
    x = torch.rand(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    seen = []
    hook = vit.blocks[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    out = vit.forward_masked(x, 0.75, noise=noise)
    hook.remove()
    assert seen == [torch.Size([2, 1 + 4, 32])]
    # changing the masked patches' pixels changes nothing the encoder returns
    masked = out.mask.view(2, 4, 4).repeat_interleave(4, 1).repeat_interleave(4, 2).bool()
    x2 = x.clone()
    x2.masked_fill_(masked[:, None], 7.0)
    out2 = vit.forward_masked(x2, 0.75, noise=noise)
    torch.testing.assert_close(out2.tokens, out.tokens)
    # ... and changing a visible one does
    x3 = x.clone()
    x3.masked_fill_(~masked[:, None], 7.0)
    assert (vit.forward_masked(x3, 0.75, noise=noise).tokens - out.tokens).abs().max() > 1e-3


@pytest.mark.parametrize("ops", ["xray", "torch"])
def test_mae_model_image_and_video(ops):
    model = MAEModel(small_vit(ops))
    loss, pred, mask = model(torch.rand(2, 3, 16, 16))
    assert pred.shape == (2, 16, 2 * 4 * 4 * 3) and mask.shape == (2, 16)
    assert mask.sum(1).tolist() == [12, 12]                    # 75% of images
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters()
               if not n.startswith("vit.head") and n != "vit.time_embed")
    loss, pred, mask = model(torch.rand(2, 3, 4, 16, 16))
    assert pred.shape == (2, 32, 96)
    assert mask.sum(1).tolist() == [32 - int(32 * 0.1)] * 2   # 90% of clips
    assert torch.isfinite(loss)


def test_mae_loss_is_the_masked_normalised_mse():
    model = MAEModel(small_vit())
    x = torch.rand(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    loss, pred, mask = model(x, noise=noise)
    target = patchify(Normalize()(x), 4, 2)
    t = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** .5
    want = (((pred - t) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, want)
    # a perfect prediction of the masked patches gives 0, whatever the visible ones hold
    perfect = torch.where(mask[..., None].bool(), t, torch.randn_like(t))
    assert losses.mae_loss(perfect, target, mask) < 1e-10


def test_patchify_order_matches_token_order():
    # token (t, h, w) of the tubelet embedding covers exactly the pixels of patchify's row
    x = torch.arange(2 * 3 * 4 * 8 * 8, dtype=torch.float64).view(2, 3, 4, 8, 8)
    rows = patchify(x, 4, 2)
    assert rows.shape == (2, 2 * 2 * 2, 2 * 4 * 4 * 3)
    t, h, w = 1, 0, 1
    want = x[:, :, 2 * t:2 * t + 2, 4 * h:4 * h + 4, 4 * w:4 * w + 4].permute(0, 2, 3, 4, 1)
    torch.testing.assert_close(rows[:, t * 4 + h * 2 + w], want.reshape(2, -1))
    img = x[:, :, 0]
    torch.testing.assert_close(patchify(img, 4, 2), patchify(img[:, :, None].repeat(1, 1, 2, 1, 1),
                                                             4, 2))


# ---------------------------------------------------------------------------------- hashtags
def test_hashtag_losses_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0], [1.0, 1.0, 1.0]])
    targets = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    t = targets.float()
    bce = -(t * logits.sigmoid().log() + (1 - t) * (1 - logits.sigmoid()).log()).mean()
    torch.testing.assert_close(losses.hashtag_loss(logits, targets, "bce"), bce)
    lsm = logits.log_softmax(-1)
    soft = -(0.5 * lsm[0, 0] + 0.5 * lsm[0, 2] + lsm[1, 1]) / 2   # the tagless sample skipped
    torch.testing.assert_close(losses.hashtag_loss(logits, targets, "softmax"), soft)
    with pytest.raises(ValueError, match="kind"):
        losses.hashtag_loss(logits, targets, "focal")
    with pytest.raises(ValueError, match="targets"):
        losses.hashtag_loss(logits, targets[:, :2])


@pytest.mark.parametrize("kind", ["bce", "softmax"])
def test_hashtag_model(kind):
    model = HashtagModel(small_vit(), 7, loss_kind=kind)
    logits = model(torch.rand(3, 3, 16, 16))
    assert logits.shape == (3, 7)
    targets = torch.zeros(3, 7)
    targets[0, 1] = targets[1, 2] = targets[1, 3] = targets[2, 0] = 1
    loss = model.loss(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and model.head.weight.grad.abs().sum() > 0
    # a clip goes through the same model
    assert model(torch.rand(1, 3, 4, 16, 16)).shape == (1, 7)


# ---------------------------------------------------------------------------------- CLIP
def test_clip_loss_by_hand():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(4, 8), dim=-1)
    txt = F.normalize(torch.randn(4, 8), dim=-1)
    s = torch.tensor(10.0)
    logits = s * img @ txt.T
    want = 0
    for i in range(4):
        want = want - logits[i].log_softmax(0)[i] / 8 - logits[:, i].log_softmax(0)[i] / 8
    torch.testing.assert_close(losses.clip_loss(img, txt, s), want)
    # aligned pairs at a high scale: near zero
    assert losses.clip_loss(img, img, torch.tensor(100.0)) < 0.1


def test_caption_siamese_and_distillation_losses():
    torch.manual_seed(0)
    a = F.normalize(torch.randn(5, 8), dim=-1)
    b = F.normalize(torch.randn(5, 8), dim=-1)
    torch.testing.assert_close(losses.caption_siamese_loss(a, b),
                               (1 - (a * b).sum(-1)).mean())
    assert losses.caption_siamese_loss(a, a) < 1e-6
    torch.testing.assert_close(losses.caption_siamese_loss(a, b, kind="infonce",
                                                           logit_scale=torch.tensor(5.0)),
                               losses.clip_loss(a, b, torch.tensor(5.0)))
    with pytest.raises(ValueError, match="logit_scale"):
        losses.caption_siamese_loss(a, b, kind="infonce")
    # embedding distillation: 1 - cos, no gradient into the teacher
    s = torch.randn(5, 8, requires_grad=True)
    t = torch.randn(5, 8, requires_grad=True)
    d = losses.embedding_distillation_loss(s, t)
    torch.testing.assert_close(d, (1 - F.cosine_similarity(s, t)).mean())
    d.backward()
    assert t.grad is None and s.grad is not None
    # logit distillation: KL(teacher || student) x T^2, zero when they agree
    ls, lt = torch.randn(4, 6), torch.randn(4, 6)
    T = 2.0
    p = (lt / T).softmax(-1)
    kl = (p * (p.log() - (ls / T).log_softmax(-1))).sum(-1).mean() * T * T
    torch.testing.assert_close(losses.logit_distillation_loss(ls, lt, temperature=T), kl)
    assert losses.logit_distillation_loss(lt, lt).abs() < 1e-6
    q, pt = (ls / T).sigmoid(), (lt / T).sigmoid()
    bern = (pt * (pt / q).log() + (1 - pt) * ((1 - pt) / (1 - q)).log()).mean() * T * T
    torch.testing.assert_close(losses.logit_distillation_loss(ls, lt, temperature=T,
                                                              kind="sigmoid"), bern)


@pytest.mark.parametrize("ops", ["xray", "torch"])
def test_clip_model_with_text_transformer(ops):
    vit = small_vit(ops)
    tower = CLIPTextTransformer.from_config(vit.cfg, ops=ops)
    model = CLIPModel(vit, tower)
    caps = ["a small red star left of a blue circle", "two green squares", "a yellow triangle"]
    img, txt, scale = model(torch.rand(3, 3, 16, 16), caps)
    assert img.shape == txt.shape == (3, 24)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(scale, torch.tensor(1 / 0.07))
    terms = model.loss_terms(img, txt, scale, text_emb2=model.encode_text(caps[::-1]))
    assert set(terms) == {"clip", "siamese", "total"}
    # xray_ops.contrastive_loss (ops="xray") is open_clip's loss
    torch.testing.assert_close(terms["clip"], losses.clip_loss(img, txt, scale))
    terms["total"].backward()
    assert model.logit_scale.grad is not None
    assert tower.token_embedding.weight.grad.abs().sum() > 0
    assert vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_text_transformer_is_causal_and_pools_eot():
    tower = CLIPTextTransformer(width=32, depth=1, heads=2, context_length=12).eval()
    ids = tower.tokenize(["a red star", "a red star and more words"])
    assert ids.shape == (2, 12) and ids[0, 0] == 49406
    with torch.no_grad():
        f = tower(ids)
        # padding after EOT (and tokens after it) cannot change the EOT features
        ids2 = ids.clone()
        eot = ids[0].argmax()
        ids2[0, eot + 1:] = 5
        torch.testing.assert_close(tower(ids2)[0], f[0])
    with pytest.raises(TypeError, match="captions"):
        tower("a single string")


def test_normalize_and_model_input_checks():
    n = Normalize()
    x = torch.ones(1, 3, 2, 2)
    torch.testing.assert_close(n(x)[0, :, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) /
                               torch.tensor([0.229, 0.224, 0.225]))
    assert n(torch.ones(1, 3, 2, 4, 4)).shape == (1, 3, 2, 4, 4)
    with pytest.raises(ValueError, match="x: expected images"):
        n(torch.ones(1, 4, 2, 2))
    with pytest.raises(TypeError, match="vit"):
        HashtagModel(torch.nn.Linear(2, 2), 3)
    with pytest.raises(ValueError, match="num_tags"):
        HashtagModel(small_vit(), 0)
    with pytest.raises(ValueError, match="mask_ratio"):
        MAEModel(small_vit(), mask_ratio=1.5)
    assert math.isclose(MAEModel(small_vit()).mask_ratio, 0.75)


def test_mae_model_with_tome_on_request():
    import xray_ops as xo

    vit = create_vit("tiny", tome=xo.ToMeConfig(r=2), **SMALL)
    loss, pred, mask = MAEModel(vit, reduce_tokens=True)(torch.rand(2, 3, 16, 16))
    loss.backward()
    assert pred.shape == (2, 16, 96) and torch.isfinite(loss)
