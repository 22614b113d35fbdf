"""reference_model ViT: timm equivalence (outputs and gradients, weights copied), checkpoint
loading, any image size, video (tubelets, separable positions), input checks."""

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

import xray_ops as xo
from reference_model import create_vit, get_config

SMALL = dict(embed_dim=32, depth=2, num_heads=2, patch_size=4, img_size=16, num_frames=4)


def timm_twin(init_values=0.1, num_classes=5, global_pool="token"):
    return TimmViT(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                   init_values=init_values, num_classes=num_classes, global_pool=global_pool,
                   dynamic_img_size=True).double()


@pytest.mark.parametrize("ops", ["xray", "torch"])
@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_timm_equivalence_outputs_and_gradients(ops, global_pool):
    ref = timm_twin(global_pool=global_pool)
    vit = create_vit("tiny", ops=ops, num_classes=5, init_values=0.1, global_pool=global_pool,
                     **SMALL).double()
    vit.load_state_dict(ref.state_dict(), strict=True)
    # our keys are timm's plus the temporal position embedding
    assert set(vit.state_dict()) == set(ref.state_dict()) | {"time_embed"}
    for shape in [(3, 3, 16, 16), (2, 3, 24, 12)]:   # the stored grid, and another (resampled)
        x = torch.rand(*shape, dtype=torch.float64)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ref(xa), vit(xb)
        torch.testing.assert_close(yb, ya, rtol=1e-10, atol=1e-12)
        g = torch.randn_like(ya)
        ref.zero_grad()
        vit.zero_grad()
        (ya * g).sum().backward()
        (yb * g).sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-9, atol=1e-12)
        ref_params = dict(ref.named_parameters())
        for name, p in vit.named_parameters():
            if name == "time_embed":
                # an image is temporal position 0: its gradient is every patch token's (the
                # sum of pos_embed's gradient where pos_embed is used as stored)
                if shape[2:] == (16, 16):
                    torch.testing.assert_close(p.grad[0, 0],
                                               ref_params["pos_embed"].grad[0, 1:].sum(0),
                                               rtol=1e-9, atol=1e-12)
                assert p.grad[0, 1:].abs().max() == 0
                continue
            want = ref_params[name].grad
            if name == "patch_embed.proj.weight":
                # each frame of the inflated kernel gets the 2-D kernel's gradient
                for t in range(p.shape[2]):
                    torch.testing.assert_close(p.grad[:, :, t], want, rtol=1e-9, atol=1e-12)
                continue
            torch.testing.assert_close(p.grad, want, rtol=1e-9, atol=1e-12, msg=name)


def test_named_configs_load_timm_state_dicts_strictly():
    # built on the meta device: names and shapes only, no memory, no time
    for name, timm_name in [("s16", "vit_small_patch16_224"), ("b16", "vit_base_patch16_224"),
                            ("l16", "vit_large_patch16_224"), ("h14", "vit_huge_patch14_224")]:
        with torch.device("meta"):
            ref = timm.create_model(timm_name, pretrained=False)
            vit = create_vit(name, num_classes=ref.num_classes)
        ours = {k: v.shape for k, v in vit.state_dict().items()}
        theirs = {k: v.shape for k, v in ref.state_dict().items()}
        assert set(ours) == set(theirs) | {"time_embed"}, name
        for k, shape in theirs.items():
            if k == "patch_embed.proj.weight":   # (D, 3, p, p) inflated to (D, 3, t, p, p)
                assert ours[k] == shape[:2] + (vit.cfg.tubelet_size,) + shape[2:], name
            else:
                assert ours[k] == shape, (name, k)
        vit.load_state_dict(ref.state_dict(), strict=True, assign=True)


def test_tiny_config_is_small():
    vit = create_vit("tiny")
    n = sum(p.numel() for p in vit.parameters())
    assert n < 3_500_000
    assert vit.cfg.img_size == 32 and vit.cfg.patch_size == 4
    assert vit.forward_features(torch.rand(2, 3, 32, 32)).shape == (2, 65, 192)


@pytest.mark.parametrize("ops", ["xray", "torch"])
def test_video_tokens_and_one_frame_clip_is_an_image(ops):
    vit = create_vit("tiny", ops=ops, **SMALL).eval()
    img = torch.rand(2, 3, 16, 20)
    with torch.no_grad():
        a = vit.forward_features(img)
        b = vit.forward_features(img[:, :, None])
        assert a.shape == (2, 1 + 4 * 5, 32)
        torch.testing.assert_close(a, b)
        clip = torch.rand(2, 3, 4, 16, 16)
        assert vit.forward_features(clip).shape == (2, 1 + 2 * 16, 32)
        # longer than the stored num_frames: the temporal embedding is interpolated
        assert vit.forward_features(torch.rand(1, 3, 8, 16, 16)).shape == (1, 1 + 4 * 16, 32)
        # a static clip (the image in every frame) embeds each tubelet as the image
        static = img[:, :, None].expand(-1, -1, 2, -1, -1)
        pe_static = vit.patch_embed(static)
        pe_img = vit.patch_embed(img)
        torch.testing.assert_close(pe_static, pe_img)


def test_separable_positions_and_joint_attention():
    vit = create_vit("tiny", **SMALL).eval()
    clip = torch.rand(1, 3, 4, 16, 16)
    tokens, grid = vit.patchify_tokens(clip)
    assert grid == (2, 4, 4)
    raw = vit.patch_embed(clip)
    pos = tokens.view(1, 2, 4, 4, 32) - raw
    # token (t, h, w) gets space[h, w] + time[t]
    space = vit.pos_embed[:, 1:].view(1, 1, 4, 4, 32)
    time = vit.time_embed[:, :2].view(1, 2, 1, 1, 32)
    torch.testing.assert_close(pos, (space + time).expand_as(pos), rtol=1e-5, atol=1e-6)
    # joint space-time attention: a change in frame 3 reaches tokens of the first tubelet
    clip2 = clip.clone()
    clip2[:, :, 3] += 1
    with torch.no_grad():
        a, b = vit.forward_features(clip), vit.forward_features(clip2)
    assert (a[:, 1:17] - b[:, 1:17]).abs().max() > 1e-4


def test_time_embed_zero_after_loading_a_2d_checkpoint():
    ref = timm_twin(init_values=None, num_classes=0)
    vit = create_vit("tiny", **SMALL).double()
    vit.load_state_dict(ref.state_dict())
    assert vit.time_embed.abs().max() == 0
    # a state_dict of our own round-trips with its time embedding
    vit2 = create_vit("tiny", **SMALL).double()
    vit2.load_state_dict(vit.state_dict())
    torch.testing.assert_close(vit2.time_embed, vit.time_embed)


def test_bad_inputs_raise_clear_errors():
    vit = create_vit("tiny", **SMALL)
    with pytest.raises(ValueError, match="x: expected images"):
        vit(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="multiples of the patch size"):
        vit(torch.rand(2, 3, 18, 16))
    with pytest.raises(ValueError, match="tubelet size"):
        vit(torch.rand(2, 3, 3, 16, 16))
    with pytest.raises(TypeError, match="floating"):
        vit(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="ops"):
        create_vit("tiny", ops="cuda")
    with pytest.raises(ValueError, match="name"):
        create_vit("giant")
    with pytest.raises(ValueError, match="unknown ViTConfig fields"):
        create_vit("tiny", widht=3)
    with pytest.raises(ValueError, match="embed_dim/num_heads"):
        get_config("tiny", embed_dim=100)
    with pytest.raises(ValueError, match="locations"):
        create_vit("tiny", evit=xo.EViTConfig(locations=(3, 6, 9)), **SMALL)
    with pytest.raises(TypeError, match="evit"):
        create_vit("tiny", evit=0.7, **SMALL)
    with pytest.raises(ValueError, match="mask_ratio"):
        vit.forward_masked(torch.rand(1, 3, 16, 16), 1.0)
