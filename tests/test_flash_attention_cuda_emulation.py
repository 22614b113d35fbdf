"""CPU checks of the CUDA flash attention kernel's index math (csrc/flash_attn/), no GPU needed.

tests/_flash_attn_cuda_emulator.py models ldmatrix and mma.sync m16n8k16 from the PTX ISA's
fragment tables and runs the kernel's steps lane by lane with the kernel's own formulas. Here:
1. the Python mirror of the formulas equals csrc/flash_attn/fragment_layout.h (compiled with the
   host C++ compiler and dumped over every lane, thread and head dim);
2. the hardware model is sound (every fragment table covers its tile once);
3. the tile loads cover every (row, 16-byte chunk) of a tile exactly once;
4. the emulated kernel reproduces float64 softmax(scale Q Kᵀ + bias) V and its lse for every
   head dim, ragged tiles, Nq != Nk, causal, key bias, several query and key blocks, with P
   kept exact (index math only: 1e-9) and with P rounded to fp16 / bf16 as the kernel does;
5. ldmatrix reads are free of shared-memory bank conflicts.
"""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from . import _flash_attn_cuda_emulator as emu

ROOT = Path(__file__).resolve().parents[1]
HEAD_DIMS = (32, 64, 80, 96, 128)


def _round(dtype):
    return lambda x: torch.from_numpy(np.asarray(x, dtype=np.float64)).to(dtype).double().numpy()


def test_formula_mirror_matches_compiled_header(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler to compile csrc/flash_attn/fragment_layout.h")
    src = tmp_path / "dump.cpp"
    src.write_text(emu.CPP_DUMPER)
    exe = tmp_path / "dump"
    subprocess.run([cxx, "-std=c++17", "-O0", f"-I{ROOT / 'csrc'}", str(src), "-o", str(exe)],
                   check=True, capture_output=True, timeout=120)
    cpp = json.loads(subprocess.run([str(exe)], check=True, capture_output=True, text=True,
                                    timeout=60).stdout)
    py = emu.formula_table(HEAD_DIMS)
    assert cpp.keys() == py.keys()
    for key in py:
        assert cpp[key] == py[key], f"fragment_layout.h and the Python mirror differ on {key}"


def test_ptx_fragment_tables_cover_each_tile_once():
    assert sorted(map(tuple, emu.A_COORDS.reshape(-1, 2).tolist())) == \
        [(r, c) for r in range(16) for c in range(16)]
    assert sorted(map(tuple, emu.B_COORDS.reshape(-1, 2).tolist())) == \
        [(k, n) for k in range(16) for n in range(8)]
    assert sorted(map(tuple, emu.C_COORDS.reshape(-1, 2).tolist())) == \
        [(r, c) for r in range(16) for c in range(8)]
    # the model's mma is a matrix product
    rng = np.random.default_rng(0)
    A = rng.standard_normal((16, 16))
    B, C = rng.standard_normal((16, 8)), rng.standard_normal((16, 8))
    a = A[emu.A_COORDS[..., 0], emu.A_COORDS[..., 1]]
    b = B[emu.B_COORDS[..., 0], emu.B_COORDS[..., 1]]
    c = C[emu.C_COORDS[..., 0], emu.C_COORDS[..., 1]]
    d = emu.mma_m16n8k16(a, b, c)
    np.testing.assert_allclose(d, (A @ B + C)[emu.C_COORDS[..., 0], emu.C_COORDS[..., 1]])


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_tile_loads_cover_the_tile_once(d):
    seen = np.zeros((emu.K_BLOCK_N, d // 8), dtype=int)
    for tid in range(emu.K_NUM_THREADS):
        if emu.load_active(tid, d):
            for i in range(emu.load_steps(d)):
                seen[emu.load_row(tid, i, d), emu.load_col(tid, d) // 8] += 1
    assert (seen == 1).all()
    # 16-byte aligned shared rows, and a pitch that is an odd number of 16-byte units
    assert emu.smem_pitch(d) % 8 == 0 and (emu.smem_pitch(d) // 8) % 2 == 1


# (Nq, Nk, causal, bias): one tile, ragged single blocks, several query and key blocks,
# Nq < Nk and Nq > Nk under the causal mask
CASES = [
    (1, 1, False, False),
    (7, 7, False, True),
    (64, 64, True, False),
    (70, 150, False, True),
    (130, 70, True, True),
    (100, 197, True, False),
]


def _problem(nq, nk, d, use_bias, seed):
    rng = np.random.default_rng(seed)
    q = _round(torch.float16)(rng.standard_normal((nq, d)))
    k = _round(torch.float16)(rng.standard_normal((nk, d)))
    v = _round(torch.float16)(rng.standard_normal((nk, d)))
    bias = np.log(rng.integers(1, 5, nk)).astype(np.float32).astype(np.float64) if use_bias \
        else None
    return q, k, v, bias


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_emulated_kernel_matches_softmax_exactly(d):
    """P kept in float64: any index error shows far above 1e-9."""
    for n, (nq, nk, causal, use_bias) in enumerate(CASES[:4] if d != 80 else CASES):
        q, k, v, bias = _problem(nq, nk, d, use_bias, seed=d * 100 + n)
        scale = d ** -0.5
        out, lse, worst = emu.emulate_attention(q, k, v, bias, scale, causal)
        r_out, r_lse = emu.reference_attention(q, k, v, bias, scale, causal)
        assert out.shape == (nq, d) and lse.shape == (nq,)
        np.testing.assert_allclose(out, r_out, rtol=0, atol=1e-9,
                                   err_msg=f"out, case {(nq, nk, causal, use_bias)}")
        np.testing.assert_allclose(lse, r_lse, rtol=0, atol=1e-9,
                                   err_msg=f"lse, case {(nq, nk, causal, use_bias)}")
        assert worst == 1, f"ldmatrix bank conflicts: {worst}-way"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_kernel_with_p_rounded_like_the_kernel(dtype):
    """P cast to the element type before P V, as the kernel does: the error stays at the
    rounding level of that type."""
    d, (nq, nk, causal, use_bias) = 80, CASES[4]
    q, k, v, bias = _problem(nq, nk, d, use_bias, seed=7)
    out, lse, _ = emu.emulate_attention(q, k, v, bias, d ** -0.5, causal, round_p=_round(dtype))
    r_out, r_lse = emu.reference_attention(q, k, v, bias, d ** -0.5, causal)
    eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    assert np.abs(out - r_out).max() < 4 * eps * np.abs(v).max()
    np.testing.assert_allclose(lse, r_lse, rtol=0, atol=1e-9)  # lse uses the fp32 sums


def test_rows_without_finite_logit_give_zero_and_minus_inf():
    """key_bias = -inf on every key: out 0, lse -inf (the documented convention); a row with a
    single finite key still works."""
    d, nq, nk = 32, 9, 70
    q, k, v, _ = _problem(nq, nk, d, False, seed=3)
    bias = np.full(nk, -np.inf)
    out, lse, _ = emu.emulate_attention(q, k, v, bias, d ** -0.5, False)
    assert (out == 0).all() and (lse == -np.inf).all()
    bias[66] = 0.5  # only one key, in the second (ragged) block, is visible
    out, lse, _ = emu.emulate_attention(q, k, v, bias, d ** -0.5, False)
    np.testing.assert_allclose(out, np.broadcast_to(v[66], (nq, d)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(lse, d ** -0.5 * q @ k[66] + 0.5, rtol=0, atol=1e-12)
