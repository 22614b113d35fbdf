"""The ToMe Triton kernels compile for the GPU (TTIR -> PTX -> cubin through Triton's ptxas, for
sm_90 and sm_80) on a machine without one: what the interpreter cannot catch (types, layouts,
ops the compiler lowers differently), and register spills (read from ptxas's own report) in
the configs the launchers use. Where a GPU is present the gpu-marked tests run the kernels
themselves, so this is skipped there.

The compile runs in a subprocess that never imports the interpreter: the suite runs with
TRITON_INTERPRET=1, whose patched ``triton.language`` stays in the process, and a GPU compile
made in that process fails (``'ir.value' object has no attribute 'dtype'``) unless a warm Triton
cache hides it. This file is also that subprocess's script: ``python <this file> <group> <cc>``.
"""

import contextlib
import importlib.util
import inspect
import io
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# the compile itself (runs in the subprocess, TRITON_INTERPRET unset)
# ----------------------------------------------------------------------------------------------
def _kernel_module(name):
    spec = importlib.util.spec_from_file_location(f"_tome_aot_{name}",
                                                  os.path.join(ROOT, "kernels", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _compile(jit_fn, types, constexprs, cc):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        print("SKIP: this Triton's ASTSource takes other arguments")
        sys.exit(0)
    sig = {n: ("constexpr" if n in constexprs else types[n]) for n in jit_fn.arg_names}
    log = io.StringIO()
    knobs = getattr(triton, "knobs", None)
    nvidia = getattr(knobs, "nvidia", None)
    spills_known = nvidia is not None and hasattr(nvidia, "dump_ptxas_log")
    if spills_known:
        nvidia.dump_ptxas_log = True  # Triton prints ptxas -v's report
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn=jit_fn, signature=sig, constexprs=constexprs),
                               target=GPUTarget("cuda", cc, 32), options={"num_warps": 4})
    finally:
        if spills_known:
            nvidia.dump_ptxas_log = False
    assert k.asm["cubin"], f"{jit_fn.__name__}: no cubin"
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log.getvalue())]
    assert not any(spills), (f"{jit_fn.__name__} {constexprs}: spills {max(spills)} bytes per "
                             f"thread for sm_{cc}:\n{log.getvalue()}")
    return k


def _p(dt):
    return "*" + dt


def compile_matching(cc):
    import triton.language as tl

    km = _kernel_module("tome_match")
    # the configs tome_match launches (BLOCK_D at its largest, for D >= 64)
    for mdt in ("bf16", "fp64"):
        acc = "fp64" if mdt == "fp64" else "fp32"
        _compile(km._tome_normalize_kernel,
                 dict(M_ptr=_p(mdt), U_ptr=_p(acc), N="i32", D="i32", stride_mb="i64",
                      stride_mn="i64", stride_md="i64"),
                 dict(ACC_DTYPE=tl.float64 if acc == "fp64" else tl.float32,
                      IS_F64=acc == "fp64", BLOCK_T=32, BLOCK_D=64), cc)
    for acc, dot in (("fp32", True), ("fp64", False)):
        _compile(km._tome_scores_kernel,
                 dict(U_ptr=_p(acc), MAX_ptr=_p(acc), IDX_ptr="*i32", N="i32", Na="i32",
                      Nb="i32", D="i32"),
                 dict(CLASS_TOKEN=True, DISTILL_TOKEN=True, USE_DOT=dot,
                      ACC_DTYPE=tl.float64 if acc == "fp64" else tl.float32,
                      BLOCK_A=32 if dot else 16, BLOCK_B=64 if dot else 16,
                      BLOCK_D=km.SCORES_BLOCK_D if dot else 16), cc)
    _compile(km._tome_rank_kernel, dict(MAX_ptr="*fp32", RANK_ptr="*i32", Na="i32"),
             dict(BLOCK_I=32, BLOCK_K=64), cc)
    _compile(km._tome_plan_kernel,
             dict(RANK_ptr="*i32", NIDX_ptr="*i32", UNM_ptr="*i64", SRC_ptr="*i64",
                  DST_ptr="*i64", DEST_ptr="*i64", SLOT_SRC_ptr="*i64", SLOT_START_ptr="*i64",
                  N="i32", Na="i32", Nb="i32", r="i32"),
             dict(CLASS_TOKEN=True, DISTILL_TOKEN=True, BLOCK_T=32, BLOCK_K=64), cc)


def compile_merge(cc):
    import triton.language as tl

    kg = _kernel_module("tome_merge")
    x = "bf16"
    _compile(kg._tome_merge_fwd_kernel,
             dict(X_ptr=_p(x), S_ptr=_p(x), SRC_ptr="*i64", START_ptr="*i64", OUT_ptr=_p(x),
                  SOUT_ptr=_p(x), N="i32", C="i32", n_out="i32", stride_xb="i64",
                  stride_xn="i64", stride_xc="i64", stride_sb="i64", stride_sn="i64"),
             dict(HAS_SIZE=True, ACC_DTYPE=tl.float32, BLOCK_T=16, BLOCK_C=128), cc)
    types = dict(GO_ptr=_p(x), GSO_ptr=_p(x), X_ptr=_p(x), S_ptr=_p(x), OUT_ptr=_p(x),
                 SOUT_ptr=_p(x), DEST_ptr="*i64", GX_ptr=_p(x), GS_ptr=_p(x), N="i32", C="i32")
    types.update({n: "i64" for n in kg._tome_merge_bwd_kernel.arg_names if n.startswith("stride")})
    _compile(kg._tome_merge_bwd_kernel, types,
             dict(HAS_SIZE=True, HAS_GSO=True, SIZE_GRAD=True, ACC_DTYPE=tl.float32, BLOCK_T=16,
                  BLOCK_C=128), cc)


_GROUPS = {"matching": compile_matching, "merge": compile_merge}

if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the interpreter cannot compile for the GPU")
    group, cc = sys.argv[1], int(sys.argv[2])
    _GROUPS[group](cc)
    print(f"OK {group} sm_{cc}")
    sys.exit(0)


# ----------------------------------------------------------------------------------------------
# the tests (run in the pytest process; each compiles in a clean subprocess)
# ----------------------------------------------------------------------------------------------
import pytest  # noqa: E402
import torch  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="a GPU is present: the gpu tests compile and run them")


@pytest.mark.parametrize("cc", [90, 80])
@pytest.mark.parametrize("group", sorted(_GROUPS))
def test_kernels_compile(group, cc):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, os.path.abspath(__file__), group, str(cc)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    out = res.stdout.strip().splitlines()
    assert res.returncode == 0, (res.stdout[-2000:] + res.stderr[-4000:])
    if out and out[-1].startswith("SKIP"):
        pytest.skip(out[-1])
    assert out and out[-1] == f"OK {group} sm_{cc}", res.stdout[-2000:]
