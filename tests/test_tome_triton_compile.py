"""The ToMe Triton kernels compile for the GPU (TTIR -> PTX -> cubin through Triton's ptxas, for
sm_90 and sm_80) on a machine without one: what the interpreter cannot catch (types, layouts,
ops the compiler lowers differently). Where a GPU is present the gpu-marked tests run the
kernels themselves, so this is skipped there."""

import importlib.util
import inspect
import os

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="a GPU is present: the gpu tests compile and run them")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compiled_module(name):
    """A fresh copy of kernels/<name>.py whose @triton.jit functions are real JITFunctions (the
    suite runs with TRITON_INTERPRET=1, which triton.jit reads when it decorates)."""
    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        spec = importlib.util.spec_from_file_location(f"_tome_aot_{name}",
                                                      os.path.join(ROOT, "kernels", f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old
    return mod


def _compile(jit_fn, types, constexprs, cc):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        pytest.skip("this Triton's ASTSource takes other arguments")
    sig = {n: ("constexpr" if n in constexprs else types[n]) for n in jit_fn.arg_names}
    return triton.compile(ASTSource(fn=jit_fn, signature=sig, constexprs=constexprs),
                          target=GPUTarget("cuda", cc, 32), options={"num_warps": 4})


def _p(dt):
    return "*" + dt


@pytest.mark.parametrize("cc", [90, 80])
def test_matching_kernels_compile(cc):
    km = _compiled_module("tome_match")
    for mdt, dot in (("bf16", True), ("fp64", False)):
        acc = "fp64" if mdt == "fp64" else "fp32"
        k = _compile(km._tome_scores_kernel,
                     dict(M_ptr=_p(mdt), MAX_ptr=_p(acc), IDX_ptr="*i32", Na="i32", Nb="i32",
                          D="i32", stride_mb="i64", stride_mn="i64", stride_md="i64"),
                     dict(CLASS_TOKEN=True, DISTILL_TOKEN=True, USE_DOT=dot,
                          ACC_DTYPE=tl.float64 if acc == "fp64" else tl.float32,
                          BLOCK_A=32 if dot else 16, BLOCK_B=64 if dot else 16,
                          BLOCK_D=64 if dot else 16), cc)
        assert k.asm["cubin"]
    _compile(km._tome_rank_kernel, dict(MAX_ptr="*fp32", RANK_ptr="*i32", Na="i32"),
             dict(BLOCK_I=32, BLOCK_K=64), cc)
    _compile(km._tome_plan_kernel,
             dict(RANK_ptr="*i32", NIDX_ptr="*i32", UNM_ptr="*i64", SRC_ptr="*i64",
                  DST_ptr="*i64", DEST_ptr="*i64", SLOT_SRC_ptr="*i64", SLOT_START_ptr="*i64",
                  N="i32", Na="i32", Nb="i32", r="i32"),
             dict(CLASS_TOKEN=True, DISTILL_TOKEN=True, BLOCK_T=32, BLOCK_K=64), cc)


@pytest.mark.parametrize("cc", [90, 80])
def test_merge_kernels_compile(cc):
    kg = _compiled_module("tome_merge")
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
