"""Triton kernels, one op per file (installed as ``xray_ops.kernels``; imported lazily)."""
