"""Argument checks shared by every op: clear errors naming the argument, expected and given."""

from __future__ import annotations

import operator
from typing import Iterable

import torch

from ._dtypes import FLOATS as _FLOATS, name as _dt


def tensor(t, name: str, *, ndim: int | Iterable[int] | None = None,
           dtypes: Iterable[torch.dtype] | None = None, floating: bool = False) -> torch.Tensor:
    """Raise TypeError/ValueError unless ``t`` is a tensor of the expected rank and dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name}: expected a {want}-D tensor, got shape {tuple(t.shape)}")
    if floating and t.dtype not in _FLOATS:
        raise TypeError(f"{name}: expected a floating dtype ({', '.join(map(_dt, _FLOATS))}), "
                        f"got {_dt(t.dtype)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{name}: expected dtype {' or '.join(map(_dt, dtypes))}, "
                            f"got {_dt(t.dtype)}")
    return t


def same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name}: expected a tensor on {ref.device} (like {ref_name}), "
                             f"got one on {t.device}")


def same_dtype(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"{name}: expected dtype {_dt(ref.dtype)} (like {ref_name}), "
                            f"got {_dt(t.dtype)}")


def shape(t: torch.Tensor, name: str, expected: tuple, what: str = "") -> None:
    """``expected`` may hold None for 'any size' in a dimension."""
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name}: expected shape {want}{' ' + what if what else ''}, "
                         f"got {tuple(t.shape)}")


def _range(lo, hi, lo_open: bool = False) -> str:
    return (f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, "
            f"{hi if hi is not None else 'inf'}]")


def integer(v, name: str, *, lo: int | None = None, hi: int | None = None) -> int:
    """``v`` as a Python int: anything ``operator.index`` takes (int, numpy integers, 0-d integer
    tensors; not bool); a torch.SymInt (under torch.compile) is passed through as it is."""
    if type(v).__name__ != "SymInt":
        try:
            if isinstance(v, bool):
                raise TypeError
            v = operator.index(v)
        except TypeError:
            raise TypeError(f"{name}: expected an int, got {type(v).__name__} ({v!r})") from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{name}: expected an int in {_range(lo, hi)}, got {v}")
    return v


def boolean(v, name: str) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__} ({v!r})")
    return v


def number(v, name: str, *, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(v).__name__} ({v!r})")
    if v != v:
        within = "" if lo is None and hi is None else f" in {_range(lo, hi, lo_open)}"
        raise ValueError(f"{name}: expected a number{within}, got NaN")
    bad = (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi)
    if bad:
        raise ValueError(f"{name}: expected a number in {_range(lo, hi, lo_open)}, got {v}")
    return float(v)
