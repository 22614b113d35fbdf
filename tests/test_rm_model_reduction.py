"""EViT and ToMe inside the reference model: token counts, forward + backward on images and
clips, ops="xray" against ops="torch" (the anchors' PyTorch) on the same weights, EViT's
schedule, and switching them on for inference only."""

import math

import pytest
import torch

import xray_ops as xo
from reference_model import create_vit

SMALL = dict(embed_dim=32, depth=4, num_heads=2, patch_size=4, img_size=16, num_frames=4,
             init_values=0.5)
EVIT = xo.EViTConfig(keep_rate=0.5, locations=(1, 3), fuse=True)
TOME = xo.ToMeConfig(r=3)
CASES = {"evit": (EVIT, None), "tome": (None, TOME), "both": (EVIT, TOME),
         "evit-nofuse": (xo.EViTConfig(keep_rate=0.6, locations=(0,), fuse=False), None),
         "tome-noprop": (None, xo.ToMeConfig(r=(4, 1.0), prop_attn=False))}


def twins(evit, tome, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    a = create_vit("tiny", ops="xray", num_classes=3, evit=evit, tome=tome, **SMALL).to(dtype)
    b = create_vit("tiny", ops="torch", num_classes=3, evit=evit, tome=tome, **SMALL).to(dtype)
    b.load_state_dict(a.state_dict())
    return a, b


def expected_tokens(n, depth, evit, tome):
    """Token count after the blocks, from the two papers' rules."""
    rs = tome.schedule(depth) if tome else [0] * depth
    for i in range(depth):
        if evit and i in evit.locations:
            keep = math.ceil(evit.keep_rate * (n - 1))
            n = 1 + keep + (1 if evit.fuse and keep < n - 1 else 0)
        else:
            n -= max(0, min(rs[i], (n - 1) // 2))
    return n


def inputs(kind, dtype):
    g = torch.Generator().manual_seed(1)
    if kind == "image":
        return torch.rand(2, 3, 16, 20, generator=g, dtype=dtype)
    return torch.rand(2, 3, 4, 16, 16, generator=g, dtype=dtype)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["image", "video"])
def test_xray_matches_torch_forward_and_backward(case, kind):
    """float64: same tokens kept/merged, same outputs, same gradients for every parameter."""
    evit, tome = CASES[case]
    a, b = twins(evit, tome)
    x = inputs(kind, torch.float64)
    n0 = 1 + (4 * 5 if kind == "image" else 2 * 16)
    fa, fb = a.forward_features(x), b.forward_features(x)
    assert fa.shape[1] == fb.shape[1] == expected_tokens(n0, 4, evit, tome) < n0
    torch.testing.assert_close(fa, fb, rtol=1e-9, atol=1e-10)
    g = torch.randn(fa.shape[0], 3, dtype=torch.float64)
    (a.forward_head(fa) * g).sum().backward()
    (b.forward_head(fb) * g).sum().backward()
    pb = dict(b.named_parameters())
    for name, p in a.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, pb[name].grad, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("case", ["evit", "tome", "both"])
def test_xray_matches_torch_float32(case):
    evit, tome = CASES[case]
    a, b = twins(evit, tome, torch.float32)
    a.eval()
    b.eval()
    x = inputs("image", torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-5)


def test_plain_model_xray_matches_torch_both_dtypes():
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        a, b = twins(None, None, dtype)
        x = inputs("video", dtype)
        torch.testing.assert_close(a(x), b(x), rtol=tol, atol=tol)


def test_gradient_flows_through_evit_attention_scores():
    """The fused token is weighted by cls_attn: its gradient reaches the block's q and k."""
    evit = xo.EViTConfig(keep_rate=0.5, locations=(0,), fuse=True)
    a, _ = twins(evit, None)
    x = inputs("image", torch.float64)
    a(x).sum().backward()
    g_with = a.blocks[0].attn.qkv.weight.grad.clone()
    # the same model where EViT's scores carry no gradient
    a.zero_grad()
    import reference_model.token_reduction as tr

    orig = tr.apply_evit
    try:
        tr.apply_evit = lambda ops, sel, x, cls_attn, *rest: orig(ops, sel, x, cls_attn.detach(),
                                                                  *rest)
        a(x).sum().backward()
    finally:
        tr.apply_evit = orig
    g_without = a.blocks[0].attn.qkv.weight.grad
    dim = a.embed_dim
    # q and k rows differ (the scores' gradient), v rows do not
    assert (g_with[:2 * dim] - g_without[:2 * dim]).abs().max() > 1e-8
    torch.testing.assert_close(g_with[2 * dim:], g_without[2 * dim:], rtol=1e-9, atol=1e-12)


def test_evit_schedule_and_eval():
    evit = xo.EViTConfig(keep_rate=0.5, locations=(1,), warmup_steps=2, shrink_steps=4)
    vit = create_vit("tiny", evit=evit, **SMALL)
    x = torch.rand(1, 3, 16, 16)
    vit.train()
    assert vit.forward_features(x).shape[1] == 17          # warm-up: keep rate 1, EViT idle
    vit.set_step(4)                                        # half-way down the cosine: 0.75
    assert vit.forward_features(x).shape[1] == 1 + math.ceil(0.75 * 16) + 1
    vit.set_step(100)
    assert vit.forward_features(x).shape[1] == 1 + 8 + 1
    vit.set_step(0)
    vit.eval()                                             # evaluation: always keep_rate
    assert vit.forward_features(x).shape[1] == 1 + 8 + 1


def test_reduction_switches_on_for_inference_only():
    vit = create_vit("tiny", **SMALL).eval()
    sd = {k: v.clone() for k, v in vit.state_dict().items()}
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        plain = vit(x)
        with vit.token_reduction(tome=TOME):
            assert vit.forward_features(x).shape[1] == expected_tokens(17, 4, None, TOME)
            merged = vit(x)
        with vit.token_reduction(evit=EVIT):
            assert vit.forward_features(x).shape[1] == expected_tokens(17, 4, EVIT, None)
        torch.testing.assert_close(vit(x), plain)   # restored
    assert (merged - plain).abs().max() > 0
    assert vit.evit_config is None and vit.tome_config is None
    assert all(torch.equal(sd[k], v) for k, v in vit.state_dict().items())
    assert set(sd) == set(vit.state_dict())


def test_both_at_once_evit_locations_skip_tome():
    vit = create_vit("tiny", evit=EVIT, tome=TOME, **SMALL)
    reds = [blk.reduction for blk in vit.blocks]
    assert [r.evit is not None for r in reds] == [False, True, False, True]
    assert [r.tome_r for r in reds] == [3, 0, 3, 0]


def test_mae_encoder_ignores_token_reduction():
    vit = create_vit("tiny", evit=EVIT, tome=TOME, **SMALL)
    out = vit.forward_masked(torch.rand(2, 3, 16, 16), 0.75)
    assert out.tokens.shape == (2, 1 + 4, 32)


def test_trace_source_is_refused():
    with pytest.raises(ValueError, match="trace_source"):
        create_vit("tiny", tome=xo.ToMeConfig(r=2, trace_source=True), **SMALL)


def test_xray_path_runs_the_fused_ops(monkeypatch):
    """ops="xray" computes with xray_ops (attention, residual+LayerNorm, bias+GELU, EViT,
    ToMe); ops="torch" with none of them."""
    import xray_ops.nn.attention as xattn

    calls = []

    def counting(mod, name):
        fn = getattr(mod, name)

        def wrapper(*a, **k):
            calls.append(name)
            return fn(*a, **k)
        monkeypatch.setattr(mod, name, wrapper)

    for name in ("layer_norm", "bias_gelu", "evit_select", "tome_merge",
                 "flash_attention_qkvpacked"):
        counting(xo, name)
    counting(xattn, "flash_attention_qkvpacked")
    counting(xo.nn.evit, "evit_select")
    x = torch.rand(1, 3, 16, 16)
    tome = xo.ToMeConfig(r=[2, 0, 0, 0])   # block 2 reduces nothing: its norm2 is fused
    vit = create_vit("tiny", evit=EVIT, tome=tome, **SMALL)
    vit(x).sum().backward()
    assert {"layer_norm", "bias_gelu", "evit_select", "tome_merge",
            "flash_attention_qkvpacked"} <= set(calls)
    calls.clear()
    create_vit("tiny", ops="torch", evit=EVIT, tome=tome, **SMALL)(x).sum().backward()
    assert calls == []


@pytest.mark.parametrize("ops", ["xray", "torch"])
def test_autocast_bfloat16(ops):
    """Mixed precision: half-precision branches, float32 residual stream, reductions included."""
    a = create_vit("tiny", ops=ops, num_classes=3, **SMALL)
    x = torch.rand(2, 3, 16, 16)
    ref = a(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = a(x)
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
    a.set_token_reduction(EVIT, TOME)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = a(torch.rand(2, 3, 4, 16, 16))
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in a.parameters() if p.grad is not None)


@pytest.mark.parametrize("ops", ["xray", "torch"])
def test_int8_quantized_model_runs_with_and_without_reduction(ops):
    """xray_ops.quantize_ (the evaluation's int8 model) on the reference model, EViT/ToMe on."""
    vit = create_vit("tiny", ops=ops, num_classes=3, **SMALL).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        ref = vit(x)
        xo.quantize_(vit)
        assert any(isinstance(m, xo.nn.Int8Linear) for m in vit.modules())
        y = vit(x)
        assert (y - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3
        with vit.token_reduction(evit=EVIT, tome=TOME):
            assert torch.isfinite(vit(torch.rand(2, 3, 4, 16, 16))).all()


def test_evit_keep_count_of_all_patches_leaves_tokens_alone():
    """keep == N - 1 (rate 0.99 of 16 patches): EViT drops nothing and adds no token."""
    evit = xo.EViTConfig(keep_rate=0.99, locations=(0, 2))
    a, b = twins(evit, None)
    x = inputs("image", torch.float64)[..., :16, :16]
    fa, fb = a.forward_features(x), b.forward_features(x)
    assert fa.shape[1] == fb.shape[1] == 17
    torch.testing.assert_close(fa, fb, rtol=1e-9, atol=1e-10)
    plain = create_vit("tiny", num_classes=3, **SMALL).double()
    plain.load_state_dict(a.state_dict())
    torch.testing.assert_close(plain.forward_features(x), fa, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", ["tome", "evit", "both"])
def test_mae_with_token_reduction_unmerges(case):
    """reduce_tokens: the blocks see fewer tokens, the decoder one per visible patch; tokens
    merged together come back equal; xray and torch agree."""
    evit, tome = CASES[case]
    a, b = twins(evit, tome)
    x = inputs("video", torch.float64)
    noise = torch.rand(2, 32, dtype=torch.float64)
    seen = []
    hook = a.blocks[-1].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    oa = a.forward_masked(x, 0.5, noise=noise, reduce_tokens=True)
    hook.remove()
    ob = b.forward_masked(x, 0.5, noise=noise, reduce_tokens=True)
    assert oa.tokens.shape == ob.tokens.shape == (2, 1 + 16, 32)
    assert seen[0] < 17
    torch.testing.assert_close(oa.tokens, ob.tokens, rtol=1e-9, atol=1e-10)
    # fewer distinct rows than tokens: merged / dropped tokens share their slot's value
    assert len(torch.unique(oa.tokens[0].round(decimals=8), dim=0)) <= seen[0]
    # default: no reduction, every visible token distinct
    assert len(torch.unique(a.forward_masked(x, 0.5, noise=noise).tokens[0], dim=0)) == 17
