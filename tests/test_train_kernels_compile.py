"""The training kernels' Triton code (layer_norm, bias_gelu, lion, contrastive_loss) compiles for
sm_90 without a GPU — the configs the launchers pick on a GPU — with no register spills and
within the shared memory of an H100/H200 (227 KB).

The compile runs in a subprocess that never imported the interpreter (see
tests/test_tome_triton_compile.py for why). This file is that subprocess's script too:
``python tests/test_train_kernels_compile.py <group> <cc>`` prints one line per kernel with its
registers, spills and shared memory (ptxas -v on the PTX Triton produced).
"""

import importlib
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


# ----------------------------------------------------------------------------------------------
# the compile itself (the subprocess, TRITON_INTERPRET unset)
# ----------------------------------------------------------------------------------------------
def _kernels(name):
    sys.path.insert(0, ROOT)
    return importlib.import_module(f"xray_ops.kernels.{name}")


def _ptxas_usage(ptx: str, cc: int) -> tuple[int, int]:
    """(registers, spill bytes) from ptxas -v on the kernel's PTX."""
    import tempfile

    import shutil

    import triton.backends.nvidia as nv

    ptxas = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")  # the one Triton uses
    if not os.path.exists(ptxas):
        ptxas = shutil.which("ptxas") or "ptxas"
    arch = f"sm_{cc}a" if cc == 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", f"-arch={arch}", src, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return regs, spills


# strides along the channels and of the parameter vectors are 1 in the common (contiguous) case,
# which Triton specializes on at launch: compile that case
_UNIT_STRIDES = ("stride_xc", "stride_rc", "stride_gyc", "stride_gsc", "stride_sc", "stride_gc",
                 "stride_g", "stride_w", "stride_b", "stride_rk", "stride_kk")


def _compile(tag, jit_fn, types, constexprs, cc, num_warps=4, num_stages=3):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = {**{n: 1 for n in _UNIT_STRIDES if n in jit_fn.arg_names}, **constexprs}

    sig = {n: ("constexpr" if n in constexprs else types.get(n, "i32")) for n in jit_fn.arg_names}
    k = triton.compile(ASTSource(fn=jit_fn, signature=sig, constexprs=constexprs),
                       target=GPUTarget("cuda", cc, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    assert k.asm["cubin"], f"{tag}: no cubin"
    regs, spills = _ptxas_usage(k.asm["ptx"], cc)
    smem = k.metadata.shared
    bad = spills > 0 or smem > SMEM_LIMIT[cc]
    print(f"{'BAD ' if bad else 'ok  '}{tag:<44} sm_{cc} regs={regs:<4} spills={spills}B "
          f"smem={smem // 1024}KB", flush=True)
    return not bad


def _ptrs(fn, dtype, overrides=None):
    t = {n: "*" + dtype for n in fn.arg_names if n.endswith("_ptr")}
    t.update({n: "i64" for n in fn.arg_names if n.startswith("stride")})
    t.update(overrides or {})
    return t


def compile_layer_norm(cc):
    k = _kernels("layer_norm")
    ok = True
    for dt in ("bf16", "fp32"):
        for C in (384, 1024, 4096, 6144, k.MAX_C):
            bm, bc = k._block(C)
            flags = dict(HAS_RESIDUAL=True, HAS_SCALE=True, HAS_W=True, HAS_B=True, BLOCK_M=bm,
                         BLOCK_C=bc)
            ok &= _compile(f"layer_norm fwd {dt} C={C}", k._layer_norm_fwd_kernel,
                           _ptrs(k._layer_norm_fwd_kernel, dt, dict(
                               G_ptr="*fp32", W_ptr="*fp32", B_ptr="*fp32", MEAN_ptr="*fp32",
                               RSTD_ptr="*fp32", eps="fp32")), flags, cc, k._warps(bc), 1)
            bm, bc = k._block(C, backward=True)
            flags = dict(HAS_GS=True, HAS_SCALE=True, HAS_W=True, HAS_B=True)
            kern, warps = k._layer_norm_bwd_kernel, k._warps(bc)
            if bc > k.BWD_MAX_C:
                kern, warps = k._layer_norm_bwd_wide_kernel, 8
                flags.update(BLOCK_C=k.WIDE_CHUNK)
            else:
                flags.update(BLOCK_M=bm, BLOCK_C=bc)
            ok &= _compile(f"layer_norm bwd {dt} C={C}", kern, _ptrs(kern, dt, dict(
                G_ptr="*fp32", W_ptr="*fp32", MEAN_ptr="*fp32", RSTD_ptr="*fp32",
                DW_ptr="*fp32", DB_ptr="*fp32", DG_ptr="*fp32")), flags, cc, warps, 1)
    return ok


def compile_bias_gelu(cc):
    k = _kernels("bias_gelu")
    ok = True
    for dt in ("bf16", "fp32"):
        for C in (1024, 4096):
            bm, bc = k._tiles(C)
            for tanh in (False, True):
                flags = dict(HAS_BIAS=True, TANH=tanh, BLOCK_M=bm, BLOCK_C=bc)
                ok &= _compile(f"bias_gelu fwd {dt} C={C} tanh={tanh}", k._bias_gelu_fwd_kernel,
                               _ptrs(k._bias_gelu_fwd_kernel, dt, dict(BIAS_ptr="*fp32")),
                               flags, cc, 4, 1)
                ok &= _compile(f"bias_gelu bwd {dt} C={C} tanh={tanh}", k._bias_gelu_bwd_kernel,
                               _ptrs(k._bias_gelu_bwd_kernel, dt, dict(BIAS_ptr="*fp32",
                                                                       GB_ptr="*fp32")),
                               flags, cc, 4, 1)
    return ok


def compile_lion(cc):
    import triton.language as tl

    k = _kernels("lion")
    ok = True
    for p, m in ((tl.float32, tl.float32), (tl.bfloat16, tl.float32), (tl.float32, tl.bfloat16),
                 (tl.bfloat16, tl.bfloat16)):
        flags = dict(P_DTYPE=p, G_DTYPE=p, M_DTYPE=m, LOG2_T=9, CHUNK=k.CHUNK)
        ok &= _compile(f"lion p={p} m={m}", k._lion_kernel,
                       dict(TABLE_ptr="*i64", T="i32", decay="fp32", lr="fp32", beta1="fp32",
                            beta2="fp32"), flags, cc, 8, 1)
    return ok


def compile_contrastive(cc):
    import torch

    k = _kernels("contrastive_loss")
    ok = True
    for dt, tdt in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        for C in (32, 64, 512, 1024):
            bm, bn, bk, warps, stages = k._config(C, tdt)
            prec = k.input_precision(tdt)
            ok &= _compile(f"contrastive stats {dt} C={C}", k._row_stats_kernel,
                           _ptrs(k._row_stats_kernel, dt, dict(SCALE_ptr="*fp32", LSE_ptr="*fp32",
                                                               ED_ptr="*fp32")),
                           dict(PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), cc, warps,
                           stages)
            bm, bn, bk, warps, stages = k._config(C, tdt, grads=True)
            ok &= _compile(f"contrastive grads {dt} C={C}", k._row_grads_kernel,
                           _ptrs(k._row_grads_kernel, dt, dict(
                               SCALE_ptr="*fp32", LSE_R_ptr="*fp32", LSE_C_ptr="*fp32",
                               DR_ptr="*fp32")),
                           dict(ROW_TERM=True, COL_TERM=True, ONE_K_BLOCK=C <= bk, PRECISION=prec,
                                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), cc, warps, stages)
    return ok


_GROUPS = {"layer_norm": compile_layer_norm, "bias_gelu": compile_bias_gelu,
           "lion": compile_lion, "contrastive": compile_contrastive}

if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the interpreter cannot compile for the GPU")
    group, cc = sys.argv[1], int(sys.argv[2])
    ok = _GROUPS[group](cc)
    print(f"{'OK' if ok else 'BAD'} {group} sm_{cc}")
    sys.exit(0 if ok else 1)


# ----------------------------------------------------------------------------------------------
# the tests (each compiles in a clean subprocess)
# ----------------------------------------------------------------------------------------------
import pytest  # noqa: E402
import torch  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="a GPU is present: the gpu tests compile and run them")


@pytest.mark.parametrize("group", sorted(_GROUPS))
def test_kernels_compile_for_sm90(group):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, os.path.abspath(__file__), group, "90"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    out = res.stdout.strip().splitlines()
    assert res.returncode == 0, (res.stdout[-3000:] + res.stderr[-4000:])
    assert out and out[-1] == f"OK {group} sm_90", res.stdout[-2000:]
