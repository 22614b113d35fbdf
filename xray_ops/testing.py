"""Test helpers shared by the whole suite (and usable by anyone validating a backend).

The criterion, after flash-attention's tests: a backend's error against the float64 reference
is at most ``factor`` (2) times PyTorch's own error when it computes the same thing in the same
dtype, plus a small ``atol``. On mismatch the message says how many elements differ, the worst
ones and where, and any NaN/Inf disagreement.
"""

from __future__ import annotations

import torch

# Small absolute slack per dtype (the "plus a small atol"), for values of order 1.
DEFAULT_ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}


def _where(flat_idx: torch.Tensor, shape) -> list[tuple]:
    out = []
    for i in flat_idx.tolist():
        coord = []
        for s in reversed(shape):
            coord.append(i % s)
            i //= s
        out.append(tuple(reversed(coord)))
    return out


def compare(actual: torch.Tensor, reference: torch.Tensor, baseline: torch.Tensor | None = None,
            *, factor: float = 2.0, atol: float | None = None, name: str = "output",
            worst: int = 5) -> str | None:
    """None if ``actual`` is close enough to ``reference``, else a report.

    actual:    the tensor under test (any dtype).
    reference: the same quantity computed in float64 (the definition).
    baseline:  the same quantity computed by PyTorch in ``actual``'s dtype; when given, the
               allowed error is ``factor * max|baseline - reference| + atol``, else ``atol``.
    """
    if actual.shape != reference.shape:
        return f"{name}: shape {tuple(actual.shape)} != reference shape {tuple(reference.shape)}"
    if atol is None:
        atol = DEFAULT_ATOL.get(actual.dtype, 1e-5)
    a = actual.detach().to(torch.float64).cpu()
    r = reference.detach().to(torch.float64).cpu()
    problems = []
    nan_a, nan_r = torch.isnan(a), torch.isnan(r)
    if not torch.equal(nan_a, nan_r):
        bad = (nan_a != nan_r).nonzero()[:worst].tolist()
        problems.append(f"NaN disagreement at {int((nan_a != nan_r).sum())} elements, e.g. {bad}")
    inf_a, inf_r = torch.isinf(a), torch.isinf(r)
    # an Inf must be matched by an Inf of the same sign
    inf_bad = (inf_a | inf_r) & ~(inf_a & inf_r & (a == r))
    if inf_bad.any():
        bad = inf_bad.nonzero()[:worst].tolist()
        problems.append(f"Inf disagreement at {int(inf_bad.sum())} elements, e.g. {bad}")
    finite = torch.isfinite(a) & torch.isfinite(r)
    err = torch.where(finite, (a - r).abs(), torch.zeros_like(a))
    allowed = atol
    base_err = None
    if baseline is not None:
        b = baseline.detach().to(torch.float64).cpu()
        fin_b = finite & torch.isfinite(b)
        base_err = float(torch.where(fin_b, (b - r).abs(), torch.zeros_like(b)).max()) \
            if b.numel() else 0.0
        allowed = factor * base_err + atol
    max_err = float(err.max()) if err.numel() else 0.0
    if max_err > allowed:
        over = err > allowed
        n_over = int(over.sum())
        k = min(worst, n_over)
        vals, idx = err.flatten().topk(k)
        lines = [f"  at {w}: got {a.flatten()[i]:.6g}, reference {r.flatten()[i]:.6g}, "
                 f"error {v:.3g}"
                 for w, i, v in zip(_where(idx, a.shape), idx.tolist(), vals.tolist())]
        base = f", PyTorch's own error in {actual.dtype} {base_err:.3g}" if base_err is not None \
            else ""
        problems.append(f"{n_over} of {a.numel()} elements exceed the allowed error {allowed:.3g}"
                        f" (max error {max_err:.3g}{base}); worst:\n" + "\n".join(lines))
    if problems:
        return f"{name} ({actual.dtype}, shape {tuple(actual.shape)}): " + "\n".join(problems)
    return None


def assert_close_to_reference(actual, reference, baseline=None, **kw) -> None:
    """AssertionError with :func:`compare`'s report when ``actual`` is not close enough."""
    report = compare(actual, reference, baseline, **kw)
    if report is not None:
        raise AssertionError(report)
