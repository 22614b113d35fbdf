"""Int8 inference modules: :class:`Int8Linear`, :class:`Int8LayerNorm` and the activation
they pass each other, :class:`QuantizedActivation`.

A quantized ViT block runs norm1 → attn.qkv and norm2 → mlp.fc1 as one ``layernorm_quant``
pass followed by an int8 GEMM: the LayerNorm returns its output already quantized (int8 +
per-token scales) wrapped in a :class:`QuantizedActivation`, which an :class:`Int8Linear` feeds
straight to ``int8_matmul``. Anything else that receives a QuantizedActivation sees an ordinary
float tensor (its dequantized value), so a consumer we did not plan for is slower, never wrong.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..ops.int8 import int8_linear, int8_matmul, layernorm_quant
from ..reference.int8 import quantize_weight


class QuantizedActivation(torch.Tensor):
    """A float activation (..., K) held as int8 ``q`` (..., K) + float32 ``scale`` (..., 1).

    Behaves as the float tensor ``q · scale`` in ``dtype`` for every operation (it is
    dequantized on first use); :class:`Int8Linear` reads ``q`` and ``scale`` directly.

    Equivalent PyTorch: ``(q.float() * scale).to(dtype)``.
    """

    q: torch.Tensor
    scale: torch.Tensor

    @staticmethod
    def __new__(cls, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        return torch.Tensor._make_wrapper_subclass(cls, q.shape, dtype=dtype, device=q.device,
                                                   requires_grad=False)

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        self.q = q
        self.scale = scale

    def dequantize(self) -> torch.Tensor:
        return (self.q.to(torch.float32) * self.scale).to(self.dtype)

    def __repr__(self) -> str:
        return (f"QuantizedActivation(shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"device={self.device})")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unwrap(t):
            return t.dequantize() if isinstance(t, QuantizedActivation) else t

        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights and per-token dynamic int8 activations (inference only).

    Buffers (saved in the state_dict): ``weight`` (out, in) int8, per-output-channel symmetric;
    ``weight_scale`` (out,) float32; ``bias`` (out,) float or None. ``activation`` None or
    "gelu" fuses an exact GELU into the GEMM epilogue.

    forward(x (..., in) float) -> (..., out) in x.dtype. A :class:`QuantizedActivation` input
    (from :class:`Int8LayerNorm`) skips the quantization.

    Equivalent PyTorch::

        w = weight.float() * weight_scale[:, None]
        x_q, s = xray_ops.quantize_per_token(x)
        y = torch.nn.functional.linear(x_q.float() * s, w, bias)   # then GELU if asked
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device=None, bias_dtype: torch.dtype = torch.float32,
                 activation: str | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8,
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32,
                                                        device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device)
                             if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, activation: str | None = None) -> "Int8Linear":
        """An Int8Linear holding ``linear``'s weight quantized per output channel."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None,
                device=w.device, bias_dtype=w.dtype, activation=activation)
        w_q, w_scale = quantize_weight(w)
        m.weight.copy_(w_q)
        m.weight_scale.copy_(w_scale)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.to(torch.float32) * self.weight_scale.to(torch.float32)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, QuantizedActivation):
            K = x.shape[-1]
            y = int8_matmul(x.q.reshape(-1, K), self.weight, x.scale.reshape(-1, 1),
                            self.weight_scale, self.bias, out_dtype=x.dtype,
                            activation=self.activation)
            return y.reshape(*x.shape[:-1], self.out_features)
        return int8_linear(x, self.weight, self.weight_scale, self.bias, self.activation)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # copy_ would silently truncate a float weight into the int8 buffer: refuse instead
        w = state_dict.get(prefix + "weight")
        if w is not None and (w.dtype != torch.int8 or tuple(w.shape) != tuple(self.weight.shape)):
            error_msgs.append(
                f"{prefix}weight: expected an int8 tensor of shape {tuple(self.weight.shape)} "
                f"(an Int8Linear's quantized weight), got {w.dtype} {tuple(w.shape)}; load a "
                f"float checkpoint before xray_ops.quantize_, or use Int8Linear.from_float")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activation={self.activation}")


class Int8LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose output comes quantized per token (``xray_ops.layernorm_quant``).

    Modifications: forward returns a :class:`QuantizedActivation` (int8 + scales) instead of a
    float tensor; the parameters and state_dict keys are nn.LayerNorm's. Used by quantize_ for
    a norm whose only consumer is an :class:`Int8Linear` (timm Block: norm1 → attn.qkv,
    norm2 → mlp.fc1). Inference only.

    Equivalent PyTorch::

        q, scale = xray_ops.quantize_per_token(
            torch.nn.functional.layer_norm(x, (C,), weight, bias, eps))
        y = (q.float() * scale).to(x.dtype)   # what any consumer but an Int8Linear sees
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = layernorm_quant(x, self.weight, self.bias, self.eps)
        return QuantizedActivation(q, scale, x.dtype)

    @classmethod
    def convert_(cls, norm: nn.LayerNorm) -> nn.LayerNorm:
        """Turn ``norm`` (an nn.LayerNorm, or a subclass such as timm's, over the last dim)
        into an Int8LayerNorm in place."""
        if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
            raise TypeError(f"norm: expected an nn.LayerNorm over the last dim, got {norm!r}")
        norm.__class__ = cls
        return norm
