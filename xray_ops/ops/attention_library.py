"""torch.library ops of the three attention entry points, and the one autograd helper they
share.

Every entry point is a pair of custom ops with fake (meta) implementations:

    xray_ops::<name>(*inputs, key_bias, scale, causal, return_cls, return_lse, backend)
        -> (out, cls_attn (empty when not asked for), lse)
    xray_ops::<name>_backward(dout, dcls, dlse, *inputs, key_bias, key_bias_grad, out, lse,
                              scale, causal, backend)
        -> (*gradients of the differentiable inputs, dkey_bias (empty when not wanted))

with ``inputs`` = (q, k, v) dense, (qkv,) packed, (q, k, v, cu_seqlens_q, cu_seqlens_k,
max_seqlen_q, max_seqlen_k) varlen. :func:`_register_autograd` connects a pair by argument
name, so the three entry points share one setup_context and one backward. The op bodies only
allocate and dispatch (``flash_attention`` / ``flash_attention_varlen`` in
:mod:`xray_ops.ops.attention_backends`).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _dispatch
from . import attention_backends as backends

# the gradients that arrive at the three outputs, and what the forward returns, by name
_FROM_BACKWARD = ("dout", "dcls", "dlse", "out", "lse", "key_bias_grad")


def _register_autograd(op, backward_op, differentiable: tuple[str, ...]) -> None:
    """Autograd of ``op`` through ``backward_op``, matched by argument name.

    Saves every forward input the backward op names (tensors and None through
    save_for_backward, the rest on ctx), calls the backward op with them, the output
    gradients, out and lse, and whether key_bias needs a gradient; returns its gradients for
    ``differentiable`` and dkey_bias for key_bias, None for every other input.
    """
    fwd_names = [a.name for a in op._opoverload._schema.arguments]
    bwd_names = [a.name for a in backward_op._opoverload._schema.arguments]
    saved_names = [n for n in bwd_names if n not in _FROM_BACKWARD]
    kb_index = fwd_names.index("key_bias")

    def setup_context(ctx, inputs, output):
        # outputs the loss does not use bring None, not zeros: no work for their gradients
        ctx.set_materialize_grads(False)
        args = dict(zip(fwd_names, inputs))
        out, _, lse = output
        tensors = {n: args[n] for n in saved_names
                   if args[n] is None or isinstance(args[n], torch.Tensor)}
        ctx.tensor_names = list(tensors) + ["out", "lse"]
        ctx.save_for_backward(*tensors.values(), out, lse)
        ctx.values = {n: args[n] for n in saved_names if n not in tensors}
        ctx.return_cls, ctx.return_lse = args["return_cls"], args["return_lse"]
        ctx.has_bias = args["key_bias"] is not None

    def backward(ctx, dout, dcls, dlse):
        args = dict(zip(ctx.tensor_names, ctx.saved_tensors), **ctx.values)
        if dout is None:  # out unused: its gradient is zero
            dout = torch.zeros_like(args["out"])
        # gradients of outputs the caller did not ask for are zeros (or None): drop them
        args.update(dout=dout, dcls=dcls if ctx.return_cls else None,
                    dlse=dlse if ctx.return_lse else None,
                    key_bias_grad=ctx.has_bias and ctx.needs_input_grad[kb_index])
        *grads, db = backward_op(*(args[n] for n in bwd_names))
        by_name = dict(zip(differentiable, grads))
        by_name["key_bias"] = db if args["key_bias_grad"] else None
        return tuple(by_name.get(n) for n in fwd_names)

    op.register_autograd(backward, setup_context=setup_context)


def _bnhd_empty(t: torch.Tensor) -> torch.Tensor:
    """Like t (B, H, N, D), in (B, N, H, D) storage: the dense op's outputs and gradients."""
    B, H, N, D = t.shape
    return t.new_empty(B, N, H, D).transpose(1, 2)


def _dense_fake(q, k, return_cls):
    B, H, Nq, _ = q.shape
    cls = q.new_empty(B, k.shape[2] if return_cls else 0)
    return _bnhd_empty(q), cls, q.new_empty(B, H, Nq, dtype=torch.float32)


def _cls_or_empty(cls, q, n_batch: int):
    return cls if cls is not None else q.new_empty(n_batch, 0)


def _db_or_empty(db, key_bias, key_bias_grad: bool, like):
    if key_bias is not None and key_bias_grad:
        return db
    return like.new_empty(0)


def _db_fake(key_bias, key_bias_grad: bool, like):
    if key_bias is not None and key_bias_grad:
        return torch.empty_like(key_bias, memory_format=torch.contiguous_format)
    return like.new_empty(0)


def _run_dense(q, k, v, key_bias, scale, causal, return_cls, backend):
    out, cls, lse = _dispatch.run(backends.OP, backend, q=q, k=k, v=v, key_bias=key_bias,
                                  scale=scale, causal=causal, want_cls=return_cls)
    return out, _cls_or_empty(cls, q, q.shape[0]), lse


def _run_dense_backward(backend, dout, dcls, dlse, q, k, v, key_bias, key_bias_grad, out, lse,
                        scale, causal, dq, dk, dv):
    return _dispatch.run_backward(backends.OP, backend, dout=dout, dcls=dcls, dlse=dlse, q=q,
                                  k=k, v=v, key_bias=key_bias, key_bias_grad=key_bias_grad,
                                  out=out, lse=lse, scale=scale, causal=causal, dq=dq, dk=dk,
                                  dv=dv)


# ----------------------------------------------------------------------------------------------
# dense: q, k, v (B, H, N, D)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("xray_ops::flash_attention", mutates_args=())
def flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       key_bias: Optional[torch.Tensor], scale: float, causal: bool,
                       return_cls: bool, return_lse: bool,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # return_lse only tells the backward whether lse's gradient is live
    return _run_dense(q, k, v, key_bias, scale, causal, return_cls, backend)


@flash_attention_op.register_fake
def _(q, k, v, key_bias, scale, causal, return_cls, return_lse, backend):
    return _dense_fake(q, k, return_cls)


@torch.library.custom_op("xray_ops::flash_attention_backward", mutates_args=())
def flash_attention_backward_op(
        dout: torch.Tensor, dcls: Optional[torch.Tensor], dlse: Optional[torch.Tensor],
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: Optional[torch.Tensor],
        key_bias_grad: bool, out: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool,
        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _bnhd_empty(q), _bnhd_empty(k), _bnhd_empty(v)
    db = _run_dense_backward(backend, dout, dcls, dlse, q, k, v, key_bias, key_bias_grad, out,
                             lse, scale, causal, dq, dk, dv)
    return dq, dk, dv, _db_or_empty(db, key_bias, key_bias_grad, q)


@flash_attention_backward_op.register_fake
def _(dout, dcls, dlse, q, k, v, key_bias, key_bias_grad, out, lse, scale, causal, backend):
    return (_bnhd_empty(q), _bnhd_empty(k), _bnhd_empty(v),
            _db_fake(key_bias, key_bias_grad, q))


_register_autograd(flash_attention_op, flash_attention_backward_op, ("q", "k", "v"))


# ----------------------------------------------------------------------------------------------
# packed: timm's qkv (B, N, 3, H, D), read and written through strided views
# ----------------------------------------------------------------------------------------------
def unpack(qkv: torch.Tensor):
    """(B, N, 3, H, D) -> q, k, v views (B, H, N, D): no copy."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


@torch.library.custom_op("xray_ops::flash_attention_qkvpacked", mutates_args=())
def flash_attention_qkvpacked_op(
        qkv: torch.Tensor, key_bias: Optional[torch.Tensor], scale: float, causal: bool,
        return_cls: bool, return_lse: bool,
        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = unpack(qkv)
    return _run_dense(q, k, v, key_bias, scale, causal, return_cls, backend)


@flash_attention_qkvpacked_op.register_fake
def _(qkv, key_bias, scale, causal, return_cls, return_lse, backend):
    q, k, _ = unpack(qkv)
    return _dense_fake(q, k, return_cls)


@torch.library.custom_op("xray_ops::flash_attention_qkvpacked_backward", mutates_args=())
def flash_attention_qkvpacked_backward_op(
        dout: torch.Tensor, dcls: Optional[torch.Tensor], dlse: Optional[torch.Tensor],
        qkv: torch.Tensor, key_bias: Optional[torch.Tensor], key_bias_grad: bool,
        out: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool,
        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = unpack(qkv)
    # one (B, N, 3, H, D) gradient: the backends write dq, dk, dv into its strided views
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    db = _run_dense_backward(backend, dout, dcls, dlse, q, k, v, key_bias, key_bias_grad, out,
                             lse, scale, causal, *unpack(dqkv))
    return dqkv, _db_or_empty(db, key_bias, key_bias_grad, qkv)


@flash_attention_qkvpacked_backward_op.register_fake
def _(dout, dcls, dlse, qkv, key_bias, key_bias_grad, out, lse, scale, causal, backend):
    return (torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype),
            _db_fake(key_bias, key_bias_grad, qkv))


_register_autograd(flash_attention_qkvpacked_op, flash_attention_qkvpacked_backward_op,
                   ("qkv",))


# ----------------------------------------------------------------------------------------------
# varlen: q (Tq, H, D), k / v (Tk, H, D), samples delimited by cu_seqlens
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("xray_ops::flash_attention_varlen", mutates_args=())
def flash_attention_varlen_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
        key_bias: Optional[torch.Tensor], scale: float, causal: bool, return_cls: bool,
        return_lse: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, cls, lse = _dispatch.run(
        backends.OP_VARLEN, backend, q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        key_bias=key_bias, scale=scale, causal=causal, want_cls=return_cls)
    return out, (cls if cls is not None else q.new_empty(0)), lse


@flash_attention_varlen_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, key_bias, scale, causal,
      return_cls, return_lse, backend):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(k.shape[0] if return_cls else 0),
            q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32))


@torch.library.custom_op("xray_ops::flash_attention_varlen_backward", mutates_args=())
def flash_attention_varlen_backward_op(
        dout: torch.Tensor, dcls: Optional[torch.Tensor], dlse: Optional[torch.Tensor],
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
        key_bias: Optional[torch.Tensor], key_bias_grad: bool, out: torch.Tensor,
        lse: torch.Tensor, scale: float, causal: bool,
        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    db = _dispatch.run_backward(
        backends.OP_VARLEN, backend, dout=dout, dcls=dcls, dlse=dlse, q=q, k=k, v=v,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, key_bias=key_bias, key_bias_grad=key_bias_grad, out=out,
        lse=lse, scale=scale, causal=causal, dq=dq, dk=dk, dv=dv)
    return dq, dk, dv, _db_or_empty(db, key_bias, key_bias_grad, q)


@flash_attention_varlen_backward_op.register_fake
def _(dout, dcls, dlse, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      key_bias, key_bias_grad, out, lse, scale, causal, backend):
    return (*(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)),
            _db_fake(key_bias, key_bias_grad, q))


_register_autograd(flash_attention_varlen_op, flash_attention_varlen_backward_op,
                   ("q", "k", "v"))
