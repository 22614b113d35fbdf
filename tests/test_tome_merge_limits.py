"""tome_merge's GPU kernels launch for every shape its input checks accept: more than 524,280
tokens (the CUDA grid once put token blocks on y, capped at 65535 x 8) and more than 65535
samples (the batch is on y now, with a grid-stride loop past the cap). The merge runs on an
identity plan (r = 0: every token is its own slot), so the torch backend's answer is x itself
and any block the grid misses shows. The Triton launcher's grid is also checked without a GPU
by tools/triton_aot_check.py (its table has N = 2**20)."""

import pytest
import torch

import xray_ops as xo
from xray_ops.reference import tome as ref


def _merge_identity(backend, B, N, C):
    x = torch.randn(B, N, C, device="cuda", dtype=torch.float16, requires_grad=True)
    size = torch.rand(B, N, 1, device="cuda", dtype=torch.float16) + 0.5
    _, _, _, dest, slot_src, slot_start = ref.identity_match(B, N, "cuda")
    with xo.backend(backend):
        out, size_out = torch.ops.xray_ops.tome_merge(x, size, dest, slot_src, slot_start,
                                                      backend)
        out.float().sum().backward()
    assert xo.last_backend("tome_merge") == backend
    return x, size, out, size_out


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("B,N", [(1, 600_001), (70_000, 5)], ids=["N600001", "B70000"])
def test_merge_launches_past_the_old_grid_limits(backend, B, N):
    x, size, out, size_out = _merge_identity(backend, B, N, 8)
    # one token per slot: size·x / size in fp32, one rounding to fp16 (a slot the grid missed
    # would hold whatever torch.empty left there)
    want = ((x.float() * size.float()) / size.float()).to(x.dtype)
    torch.testing.assert_close(out, want, rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(size_out, size, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, torch.ones_like(x), rtol=0, atol=0)
