"""Tile configs of the Triton flash attention: what `auto` may pick fits the GPU, a forced
config that cannot fit fails clearly, and fp32 follows torch's TF32 setting.

Whether the admitted tiles compile without spills is tests/test_triton_aot.py's job (it
compiles them); here the shared-memory bound and the choice of tiles per call.
"""

import pytest
import torch

from xray_ops.kernels import flash_attention as kf
from xray_ops.kernels import flash_attention_bwd as kb
from xray_ops.testing import assert_close_to_reference

POLICIES = [kf.FWD, kb.DKDV, kb.DQ]
KINDS = {"fp16": 2, "tf32": 4, "ieee": 4}  # dot kind -> operand bytes


@pytest.fixture
def matmul_precision():
    """Restore torch's float32 matmul setting after the test."""
    old = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_head_dim_has_tiles_within_shared_memory(policy, kind):
    """For every head dim the backend takes (16..256) and sequence length, some tile is
    admitted and each fits sm_90's 227 KB; so on an A100 (163 KB) and a 99 KB GPU (sm_86/89)."""
    for d in range(16, 257):
        for n in (16, 256, 4096):
            tiles = policy.admitted(kind, d, KINDS[kind], kf.SM90_SMEM, n, n)
            assert tiles, (policy.name, kind, d, n)
            for t in tiles:
                assert d <= t.max_d
                assert policy.smem(t.shape, d, KINDS[kind]) <= kf.SM90_SMEM, (t, d)
        for limit in (163 * 1024, 99 * 1024):
            tiles = policy.admitted(kind, d, KINDS[kind], limit, 4096, 4096)
            assert tiles and all(policy.smem(t.shape, d, KINDS[kind]) <= limit for t in tiles), \
                (kind, d, limit)


def test_smem_bound_matches_the_compiled_kernels():
    """The bound used for pruning is not below what Triton allocated for sm_90 (measured by
    tools/triton_aot_check.py: fp16 forward D=256 (64, 64, 4, 3) 225 KB; dK/dV D=128
    (64, 128, 8, 2) 129.5 KB; dQ D=128 (128, 64, 8, 2) 129 KB; tf32 forward D=128
    (64, 32, 4, 2) 97 KB)."""
    assert kf.FWD.smem((64, 64, 4, 3), 256, 2) >= 225 * 1024
    assert kb.DKDV.smem((64, 128, 8, 2), 128, 2) >= 129.5 * 1024
    assert kb.DQ.smem((128, 64, 8, 2), 128, 2) >= 129 * 1024
    assert kf.FWD.smem((64, 32, 4, 2), 128, 4) >= 97 * 1024


def test_forced_config_beyond_shared_memory_fails_clearly():
    q = torch.randn(1, 1, 4, 256, dtype=torch.float16)
    too_big = kf._config(128, 64, 8, 3)  # ~260 KB of fp16 K/V stages at D = 256
    with pytest.raises(ValueError, match=r"BLOCK_M=128 BLOCK_N=64 .*shared memory.*head dim 256"):
        kf.flash_attention_forward(q, q, q, None, 0.0625, False, False, config=too_big)
    out = torch.zeros_like(q)
    lse = torch.zeros(1, 1, 4)
    with pytest.raises(ValueError, match="dK/dV: tile config BLOCK_M=64 BLOCK_N=128"):
        kb.flash_attention_backward(q, None, None, q, q, q, None, out, lse, 0.0625, False,
                                    torch.empty_like(q), torch.empty_like(q), torch.empty_like(q),
                                    dkdv_config=kf._config(64, 128, 8, 3))


def test_fp32_dots_follow_torch_tf32_setting(matmul_precision):
    matmul_precision("highest")
    assert kf.input_precision(torch.float32) == "ieee"
    matmul_precision("high")
    assert kf.input_precision(torch.float32) == "tf32"
    assert kf.input_precision(torch.float16) == "tf32"  # fp16 dots ignore it
    assert kf.dot_kind(torch.float32, "tf32") == "tf32"
    assert kf.dot_kind(torch.bfloat16, "tf32") == "fp16"
    assert kf.dot_kind(torch.float32, "ieee") == "ieee"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fp32_under_tf32_setting_matches_reference(device, matmul_precision):
    """fp32 with TF32 allowed takes the tensor-core tiles; held to the error PyTorch makes
    under the same setting. (The interpreter computes dots exactly: on the CPU this checks
    the launch path.)"""
    from .test_flash_attention import _inputs, check_against_reference

    matmul_precision("high")
    q, k, v, key_bias = _inputs(2, 3, 37, 37, 80, True, torch.float32, device)
    check_against_reference("triton", q, k, v, key_bias, False)


def test_lengths_share_a_tuning_bucket():
    assert [kf.length_bucket(n) for n in (1, 16, 17, 197, 199, 256, 257)] == \
        [16, 16, 32, 256, 256, 256, 512]
