"""Compile Triton kernels for sm_80 / sm_90 without a GPU (ahead of time, to cubin).

    TRITON_INTERPRET=0 python tools/triton_aot_check.py [--quick] [--arch 80,90] [--dtypes fp16]

Catches what the interpreter cannot: Triton frontend/type errors in GPU-only code paths,
ptxas failures, and tile configs that exceed shared memory. Prints one line per compile.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _ptr_type(name: str, dtype: str) -> str:
    n = name[:-4]
    if n in ("LSE", "DELTA", "DLSE", "DB"):
        return "*fp32"
    if n in ("CU_Q", "CU_K"):
        return "*i32"
    if n == "BIAS":
        return "*fp32"
    return "*" + dtype


def signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for i, name in enumerate(fn.arg_names):
        if i in fn.constexprs or name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = _ptr_type(name, dtype)
        elif name in ("scale", "qk_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_one(kernel, dtype, constexprs, cfg, arch):
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    consts = dict(constexprs)
    opts = {}
    if cfg is not None:
        consts.update(cfg.kwargs)
        opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    src = triton.compiler.ASTSource(fn=fn, signature=signature(fn, dtype, consts),
                                    constexprs=consts)
    c = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    return c.metadata.shared


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true",
                   help="one config per kernel, D=80, fp16 and bf16 only")
    p.add_argument("--arch", default="80,90")
    p.add_argument("--dtypes", default=None, help="comma-separated subset of fp16,bf16,fp32")
    a = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from xray_ops.kernels import flash_attention as kf, flash_attention_bwd as kb

    archs = [int(x) for x in a.arch.split(",")]
    dims = [80] if a.quick else [32, 64, 80, 96, 128]
    dtypes = ["fp16", "bf16"] if a.quick else ["fp16", "bf16", "fp32"]
    if a.dtypes:
        dtypes = a.dtypes.split(",")
    failures = 0
    jobs = []
    # every feature on, then every feature off (the constexpr branches compile either way)
    flag_sets = [dict(CAUSAL=True, HAS_BIAS=True, HAS_CLS=True, HAS_DLSE=True),
                 dict(CAUSAL=False, HAS_BIAS=False, HAS_CLS=False, HAS_DLSE=False)]
    for D, dtype, flags in itertools.product(dims, dtypes, flag_sets):
        d0, d1 = kf.head_dim_blocks(D)
        prec = "ieee" if dtype == "fp32" else "tf32"
        base = dict(HEAD_DIM=D, BLOCK_D0=d0, BLOCK_D1=d1, CAUSAL=flags["CAUSAL"],
                    HAS_BIAS=flags["HAS_BIAS"], VARLEN=False, INPUT_PRECISION=prec)
        has_cls, has_dlse = flags["HAS_CLS"], flags["HAS_DLSE"]
        fwd_cfgs = kf.FWD_CONFIGS[:1] if a.quick else kf.FWD_CONFIGS
        dkdv_cfgs = kb.DKDV_CONFIGS[:1] if a.quick else kb.DKDV_CONFIGS
        dq_cfgs = kb.DQ_CONFIGS[:1] if a.quick else kb.DQ_CONFIGS
        for cfg in fwd_cfgs:
            jobs.append(("fwd", kf._attn_fwd, dtype, base, cfg))
        jobs.append(("fwd-varlen", kf._attn_fwd, dtype, {**base, "VARLEN": True}, fwd_cfgs[0]))
        jobs.append(("cls", kf._cls_attn_kernel, dtype, {**base, "BLOCK_N": 64}, None))
        jobs.append(("cls-varlen", kf._cls_attn_kernel, dtype,
                     {**base, "BLOCK_N": 64, "VARLEN": True}, None))
        jobs.append(("pre", kb._attn_bwd_preprocess_kernel, dtype,
                     {**base, "HAS_DLSE": has_dlse, "HAS_CLS": has_cls, "BLOCK_M": 64,
                      "BLOCK_N": 64},
                     None))
        for cfg in dkdv_cfgs:
            jobs.append(("dkdv", kb._attn_bwd_dkdv, dtype, {**base, "HAS_CLS": has_cls}, cfg))
        for cfg in dq_cfgs:
            jobs.append(("dq", kb._attn_bwd_dq, dtype, {**base, "HAS_CLS": has_cls}, cfg))
        jobs.append(("dkdv-varlen", kb._attn_bwd_dkdv, dtype,
                     {**base, "HAS_CLS": has_cls, "VARLEN": True}, dkdv_cfgs[0]))
        jobs.append(("dq-varlen", kb._attn_bwd_dq, dtype,
                     {**base, "HAS_CLS": has_cls, "VARLEN": True}, dq_cfgs[0]))
    for (name, kernel, dtype, consts, cfg), arch in itertools.product(jobs, archs):
        t = time.time()
        tag = (f"{name:<11} sm_{arch} {dtype} D={consts['HEAD_DIM']:<3} "
               f"{'all-on ' if consts['HAS_BIAS'] else 'all-off'}")
        if cfg is not None:
            tag += f" M={cfg.kwargs['BLOCK_M']:<3} N={cfg.kwargs['BLOCK_N']:<3} " \
                   f"w={cfg.num_warps} s={cfg.num_stages}"
        try:
            smem = compile_one(kernel, dtype, consts, cfg, arch)
            over = smem > SMEM_LIMIT[arch]
            print(f"{'SMEM ' if over else 'ok   '}{tag} smem={smem // 1024}KB "
                  f"{time.time() - t:.1f}s", flush=True)
        except Exception as e:  # report and go on
            failures += 1
            msg = str(e).strip().splitlines()
            print(f"FAIL {tag}: {type(e).__name__}: {msg[-1] if msg else ''}", flush=True)
    print(f"{len(jobs) * len(archs)} compiles, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
