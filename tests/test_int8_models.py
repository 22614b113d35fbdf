"""Int8Linear, quantize_ (timm ViT-S, SmoothQuant, state_dict) and accuracy on a real task."""

import copy
import io

import pytest
import torch
from torch import nn

import xray_ops as xo
from xray_ops.nn import Int8LayerNorm, Int8Linear, QuantizedActivation
from xray_ops.reference import int8 as ref

timm = pytest.importorskip("timm")


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _small_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    cfg = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    cfg.update(kw)
    return VisionTransformer(**cfg).eval()


# ----------------------------------------------------------------------------------------------
# Int8Linear
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def test_int8_linear_from_float():
    lin = nn.Linear(96, 40)
    m = Int8Linear.from_float(lin)
    w_q, w_s = ref.quantize_weight(lin.weight)
    assert m.weight.dtype == torch.int8 and torch.equal(m.weight, w_q)
    assert torch.equal(m.weight_scale, w_s) and torch.equal(m.bias, lin.bias)
    x = torch.randn(3, 7, 96)
    y = m(x)
    assert y.shape == (3, 7, 40) and y.dtype == torch.float32
    assert _rel(y, lin(x)) < 0.015
    # the dequantized weight is within half a step of the float one, per output channel
    err = (m.dequantized_weight() - lin.weight).abs()
    assert (err <= 0.5 * m.weight_scale[:, None] * (1 + 1e-6)).all()
    assert sorted(m.state_dict()) == ["bias", "weight", "weight_scale"]
    with pytest.raises(TypeError, match="linear: expected a torch.nn.Linear"):
        Int8Linear.from_float(nn.Conv2d(3, 3, 1))


@torch.no_grad()
@pytest.mark.parametrize("backend", ["auto", "torch", "cpu"])
def test_quantize_tiny_mlp_with_one_input_feature(backend):
    # Linear(1, 8): K == 1, where torch._int_mm on the CPU returned garbage (off by ~3e4)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(5, 1)
    want = model(x)
    xo.quantize_(model)
    with xo.backend(backend):
        got = model(x)
    # two per-token int8 quantizations: ~1% of the output scale
    assert (got - want).abs().max() <= 0.02 * want.abs().max() + 1e-3, (got, want)


@torch.no_grad()
def test_int8_linear_refuses_a_float_checkpoint():
    lin = nn.Linear(16, 8)
    m = Int8Linear.from_float(lin)
    with pytest.raises(RuntimeError, match="weight: expected an int8 tensor of shape"):
        m.load_state_dict(lin.state_dict() | {"weight_scale": torch.ones(8)})


@torch.no_grad()
def test_layernorm_quant_module_feeds_int8_linear_and_dequantizes_elsewhere():
    norm = nn.LayerNorm(32)
    nn.init.normal_(norm.weight, 1.0, 0.2)
    nn.init.normal_(norm.bias, 0.0, 0.2)
    lin = Int8Linear.from_float(nn.Linear(32, 12))
    x = torch.randn(2, 5, 32)
    q_ref, s_ref = xo.layernorm_quant(x, norm.weight, norm.bias, norm.eps)
    Int8LayerNorm.convert_(norm)
    assert sorted(norm.state_dict()) == ["bias", "weight"]
    h = norm(x)
    assert isinstance(h, QuantizedActivation) and h.shape == x.shape and h.dtype == x.dtype
    assert torch.equal(h.q, q_ref) and torch.equal(h.scale, s_ref)
    # the Int8Linear consumes the int8 activation as is: the same as quantizing the float LN
    want = xo.int8_matmul(q_ref.reshape(-1, 32), lin.weight, s_ref.reshape(-1, 1),
                          lin.weight_scale, lin.bias).reshape(2, 5, 12)
    assert torch.equal(lin(h), want)
    # any other consumer sees the dequantized float tensor (slower, never wrong)
    deq = q_ref.float() * s_ref
    torch.testing.assert_close(h + 1, deq + 1)
    torch.testing.assert_close(h.sum(-1), deq.sum(-1))
    assert _rel(deq, nn.functional.layer_norm(x, (32,), norm.weight, norm.bias, norm.eps)) < 0.01


# ----------------------------------------------------------------------------------------------
# quantize_ on timm ViT-S
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_s():
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False).eval()


@torch.no_grad()
def test_quantize_vit_s(vit_s):
    x = torch.randn(2, 3, 224, 224)
    feats = vit_s.forward_features(x)
    logits = vit_s.forward_head(feats)
    q = xo.quantize_(copy.deepcopy(vit_s), filter_fn=lambda m, name: name != "head")
    linears = [n for n, m in vit_s.named_modules() if isinstance(m, nn.Linear)]
    swapped = {n for n, m in q.named_modules() if isinstance(m, Int8Linear)}
    assert swapped == set(linears) - {"head"} and len(swapped) == 4 * 12
    assert type(q.head) is nn.Linear and type(q.patch_embed.proj) is nn.Conv2d
    for blk in q.blocks:
        assert isinstance(blk.norm1, Int8LayerNorm) and isinstance(blk.norm2, Int8LayerNorm)
        assert blk.mlp.fc1.activation == "gelu" and isinstance(blk.mlp.act, nn.Identity)
    assert not isinstance(q.norm, Int8LayerNorm)  # the final norm feeds the float head
    q_feats = q.forward_features(x)
    q_logits = q.forward_head(q_feats)
    assert xo.last_backend("layernorm_quant") == "cpu" and xo.last_backend("int8_matmul") == "cpu"
    # every token's features within 2%; the logits read the CLS token alone, which timm
    # initialises at ~0 (std 1e-6): in a random-init ViT it is nothing but the sum of the 24
    # int8-computed residual branches, so its error is the branches' (measured 3.5%)
    assert _rel(q_feats, feats) < 0.02
    assert _rel(q_logits, logits) < 0.04


@torch.no_grad()
def test_quantize_vit_s_avg_pool_logits():
    # a global-average-pool ViT-S reads every token: its logits are within 2% (measured 1.1%)
    torch.manual_seed(1)
    m = timm.create_model("vit_small_patch16_224", pretrained=False, global_pool="avg").eval()
    x = torch.randn(2, 3, 224, 224)
    want = m(x)
    q = xo.quantize_(m, filter_fn=lambda mod, name: name != "head")
    assert _rel(q(x), want) < 0.02


@torch.no_grad()
def test_quantized_state_dict_round_trip(vit_s):
    filt = lambda m, name: name != "head"  # noqa: E731
    q = xo.quantize_(copy.deepcopy(vit_s), filter_fn=filt)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    sd = torch.load(io.BytesIO(buf.getvalue()))
    assert sd["blocks.0.attn.qkv.weight"].dtype == torch.int8
    assert "blocks.0.attn.qkv.weight_scale" in sd and sd["head.weight"].dtype == torch.float32
    torch.manual_seed(123)  # another random init, quantized the same way, then loaded
    other = xo.quantize_(timm.create_model("vit_small_patch16_224", pretrained=False).eval(),
                         filter_fn=filt)
    other.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(other(x), q(x))


def test_quantize_makes_the_model_inference_only():
    m = _small_vit()
    xo.quantize_(m)
    assert not any(p.requires_grad for p in m.parameters())
    m(torch.randn(1, 3, 32, 32))  # no torch.no_grad() needed
    y = m(torch.randn(1, 3, 32, 32))
    assert not y.requires_grad


def test_quantize_skips_multihead_attention_projection_and_checks_arguments():
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    model = nn.Sequential(nn.Linear(16, 16))
    model.add_module("mha", mha)
    xo.quantize_(model)
    assert isinstance(model[0], Int8Linear) and type(mha.out_proj) is not Int8Linear
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        xo.quantize_("vit")
    with pytest.raises(TypeError, match="config: expected an xray_ops.Int8Config"):
        xo.quantize_(_small_vit(), config={"smooth_alpha": 0.5})
    with pytest.raises(TypeError, match="filter_fn: expected a callable"):
        xo.quantize_(_small_vit(), filter_fn="head")
    with pytest.raises(ValueError, match="calibration: SmoothQuant"):
        xo.quantize_(_small_vit(), xo.Int8Config(smooth_alpha=0.5))
    with pytest.raises(ValueError, match="smooth_alpha: expected a number in"):
        xo.quantize_(_small_vit(), xo.Int8Config(smooth_alpha=1.5, calibration=torch.zeros(1)))


# ----------------------------------------------------------------------------------------------
# SmoothQuant
# ----------------------------------------------------------------------------------------------
def _with_outlier_channels(model, channels=(3, 17, 40), factor=40.0):
    """The same float function, but LayerNorm outputs with a few huge channels (what trained
    transformers show): LN weight/bias x factor, the next Linear's input columns / factor."""
    with torch.no_grad():
        for blk in model.blocks:
            for norm, lin in ((blk.norm1, blk.attn.qkv), (blk.norm2, blk.mlp.fc1)):
                for c in channels:
                    norm.weight[c] *= factor
                    norm.bias[c] *= factor
                    lin.weight[:, c] /= factor
    return model


@torch.no_grad()
def test_smoothquant_recovers_outlier_channels():
    torch.manual_seed(0)
    model = _with_outlier_channels(_small_vit())
    calib = torch.randn(8, 3, 32, 32)
    x = torch.randn(8, 3, 32, 32)
    want = model.forward_features(x)
    plain = xo.quantize_(copy.deepcopy(model))
    smooth = xo.quantize_(copy.deepcopy(model), xo.Int8Config(smooth_alpha=0.5, calibration=calib))
    e_plain = _rel(plain.forward_features(x), want)
    e_smooth = _rel(smooth.forward_features(x), want)
    assert e_smooth < 0.5 * e_plain, (e_plain, e_smooth)


@torch.no_grad()
def test_smoothing_alone_keeps_the_float_function():
    from xray_ops.quantize import smooth_

    torch.manual_seed(0)
    model = _with_outlier_channels(_small_vit())
    x = torch.randn(4, 3, 32, 32)
    want = model(x)
    factors = smooth_(model, [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)], 0.5)
    assert sorted(factors) == ["blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1",
                               "blocks.1.norm2"]
    assert factors["blocks.0.norm1"][3] > 5 * factors["blocks.0.norm1"][4]  # outliers shrunk
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# accuracy on a real task
# ----------------------------------------------------------------------------------------------
def test_trained_small_vit_loses_under_one_point_top1():
    """A small ViT trained here on one core (Fashion-MNIST from Debian's dataset-fashion-mnist
    when installed, else scikit-learn's digits), then quantize_'d (head in float)."""
    from bench import int8_task

    threads = torch.get_num_threads()
    try:
        report, _, q_model, data = int8_task.run(seed=0, threads=1, quick=True)
    finally:
        torch.set_num_threads(threads)
    print(f"\n{report.data}: float top-1 {report.float_top1:.4f}, int8 {report.int8_top1:.4f} "
          f"(lost {report.lost_points:+.2f} points), all-int8 {report.int8_all_top1:.4f}, "
          f"trained in {report.train_s:.1f} s")
    # chance is 0.1; the short run reaches ~0.96 on digits and ~0.75 on Fashion-MNIST
    trained = 0.9 if data.name.startswith("sklearn digits") else 0.65
    assert report.float_top1 > trained, f"the float model did not train ({report.data})"
    assert isinstance(q_model.blocks[0].attn.qkv, Int8Linear)
    assert report.lost_points < 1.0
