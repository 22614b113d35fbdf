"""The dispatch contract: named inputs per direction, availability on the implementation,
errors that describe their inputs, lazy imports, and GPUs the build did not target (faked on
the CPU: fake CUDA tensors, a faked compute capability and extension)."""

import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import xray_ops as xo
from xray_ops import _dispatch, _ext
from xray_ops._dispatch import BackendError


@pytest.fixture
def toy_op():
    """A throwaway op "toy" with a forward and a backward, removed afterwards."""
    name = "toy_test_op"
    _dispatch.declare(name, forward=("x", "n"), backward=("grad", "x", "n"), key="x",
                      priority=("cpu", "torch"))
    yield name
    _dispatch._SPECS.pop(name, None)
    _dispatch._IMPLS.pop(name, None)
    _dispatch._LAST.pop(name, None)
    _dispatch._LAST.pop(name + ".backward", None)


def test_checks_are_per_direction_over_named_inputs(toy_op):
    seen = []

    def fwd_check(i):
        seen.append(("fwd", i._fields, i.n))
        return ["n too big"] if i.n > 3 else []

    def bwd_check(i):
        seen.append(("bwd", i._fields, i.grad.shape))
        return []

    _dispatch.register(toy_op, "torch", forward=lambda x, n: x * n,
                       backward=lambda grad, x, n: grad * n, dtypes=_dispatch.FLOATS,
                       forward_check=fwd_check, backward_check=bwd_check)
    x = torch.ones(2)
    assert torch.equal(_dispatch.run(toy_op, "auto", x=x, n=2), 2 * x)
    assert torch.equal(_dispatch.run_backward(toy_op, "auto", grad=x, x=x, n=3), 3 * x)
    assert seen == [("fwd", ("x", "n"), 2), ("bwd", ("grad", "x", "n"), (2,))]
    with pytest.raises(BackendError, match="forced backend 'torch' cannot take these inputs: "
                                           "n too big"):
        _dispatch.run(toy_op, "torch", x=x, n=4)
    with pytest.raises(TypeError, match=r"expected the inputs \('x', 'n'\), got \['m', 'x'\]"):
        _dispatch.run(toy_op, "auto", x=x, m=1)


def test_registration_errors(toy_op):
    with pytest.raises(ValueError, match="not declared"):
        _dispatch.register("no_such_op", "torch", forward=print, dtypes=_dispatch.FLOATS)
    with pytest.raises(ValueError, match="backend: expected one of"):
        _dispatch.register(toy_op, "gpu", forward=print, dtypes=_dispatch.FLOATS)
    with pytest.raises(ValueError, match="key: expected one of the forward inputs"):
        _dispatch.declare("toy_bad", forward=("a",), key="x")
    with pytest.raises(ValueError, match="already declared"):
        _dispatch.declare(toy_op, forward=("x",), key="x")
    _dispatch.declare(toy_op, forward=("x", "n"), backward=("grad", "x", "n"), key="x",
                      priority=("cpu", "torch"))  # the same declaration again: fine
    _dispatch.declare("toy_fwd_only", forward=("x",), key="x")
    try:
        with pytest.raises(ValueError, match="declares no backward"):
            _dispatch.register("toy_fwd_only", "torch", forward=print, backward=print,
                               dtypes=_dispatch.FLOATS)
    finally:
        _dispatch._SPECS.pop("toy_fwd_only")
        _dispatch._IMPLS.pop("toy_fwd_only")


def test_availability_lives_on_the_implementation(toy_op, monkeypatch):
    """Two cpu implementations: one on numba, one on PyTorch's own kernels. Without numba only
    the first is unavailable (no special case by backend name)."""
    _dispatch.register(toy_op, "cpu", forward=lambda x, n: x + n, dtypes=_dispatch.FLOATS)
    _dispatch.declare("toy_torch_cpu", forward=("x", "n"), key="x")
    _dispatch.register("toy_torch_cpu", "cpu", forward=lambda x, n: x + n,
                       dtypes=_dispatch.FLOATS, runtime=_dispatch.TORCH)
    try:
        monkeypatch.setattr(_dispatch, "_module_present", lambda m: m != "numba")
        x = torch.ones(2)
        assert _dispatch.reasons_for(toy_op, (x, 1))["cpu"] == [
            "numba is not installed (pip install numba)"]
        assert _dispatch.reasons_for("toy_torch_cpu", (x, 1))["cpu"] == []
        ok, why = _dispatch.backend_status("cpu")
        assert ok and "numba is not installed" in why
    finally:
        _dispatch._SPECS.pop("toy_torch_cpu")
        _dispatch._IMPLS.pop("toy_torch_cpu")


def test_backend_error_describes_the_inputs(toy_op):
    _dispatch.register(toy_op, "cpu", forward=lambda x, n: x, dtypes=(torch.float64,))
    x = torch.randn(3, 4, dtype=torch.float32).t()  # non-contiguous: strides are shown
    with pytest.raises(BackendError) as e:
        _dispatch.run(toy_op, "auto", x=x, n=5)
    msg = str(e.value)
    assert "no backend can take these inputs" in msg
    assert "cpu: dtype float32 not supported (supports ['float64'])" in msg
    assert "x  shape=(4, 3) dtype=float32 device=cpu stride=(1, 4)" in msg
    assert "n  5" in msg
    assert e.value.op == toy_op and not e.value.backward and e.value.requested == "auto"
    assert e.value.reasons == {"cpu": ["dtype float32 not supported (supports ['float64'])"]}
    assert e.value.inputs["n"] == "5"
    # the public ops carry the same description
    q = torch.randn(1, 2, 5, 32)
    with pytest.raises(BackendError, match=r"(?s)forced backend 'cuda'.*q\s+shape=\(1, 2, 5, 32\) "
                                           r"dtype=float32 device=cpu.*causal\s+False"):
        with xo.backend("cuda"):
            xo.flash_attention(q, q, q)


def test_forced_backend_without_backward_falls_back_to_auto(toy_op):
    _dispatch.register(toy_op, "cpu", forward=lambda x, n: x, dtypes=_dispatch.FLOATS,
                       runtime=_dispatch.TORCH)
    _dispatch.register(toy_op, "torch", forward=lambda x, n: x,
                       backward=lambda grad, x, n: grad, dtypes=_dispatch.FLOATS)
    x = torch.ones(2)
    _dispatch.run_backward(toy_op, "cpu", grad=x, x=x, n=1)
    assert xo.last_backend(toy_op + ".backward") == "torch"


def test_reports_say_what_ran(toy_op):
    _dispatch.register(toy_op, "torch", forward=lambda x, n: x, backward=lambda grad, x, n: grad,
                       dtypes=_dispatch.FLOATS, forward_reports=lambda i: f"torch+{i.n}",
                       backward_reports="triton")
    x = torch.ones(2)
    _dispatch.run(toy_op, "torch", x=x, n=7)
    _dispatch.run_backward(toy_op, "torch", grad=x, x=x, n=7)
    assert xo.last_backend(toy_op) == "torch+7"
    assert xo.last_backend(toy_op + ".backward") == "triton"


def test_lazy_imports_on_first_call_and_tuples_lists():
    name = "tests._lazy_probe_module"
    sys.modules.pop(name, None)
    fn = _dispatch.lazy(name, "pair")
    assert name not in sys.modules
    assert fn(3) == (3, 4)  # the module returns a list
    assert name in sys.modules
    missing = _dispatch.lazy("xray_ops._C", "no_such_entry_point")
    if not _ext.status()["built"]:
        with pytest.raises(RuntimeError, match="cuda backend unavailable"):
            missing()
    else:
        with pytest.raises(AttributeError, match="no_such_entry_point"):
            missing()


# ----------------------------------------------------------------------------------------------
# GPUs the build did not target
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("archs,cc,ok", [
    ("sm_80;sm_90a", (8, 0), True),
    ("sm_80;sm_90a", (8, 6), True),  # sm_80 cubins run on 8.x, x >= 0 (A10, RTX 30xx)
    ("sm_80;sm_90a", (8, 9), True),  # L4, RTX 40xx
    ("sm_80;sm_90a", (9, 0), True),  # H100 / H200: the arch-specific sm_90a image
    ("sm_80;sm_90a", (7, 5), False),  # T4: older than every image
    ("sm_80;sm_90a", (10, 0), False),  # B200: no PTX to JIT
    ("sm_80;sm_90a", (12, 0), False),  # RTX 50xx
    ("sm_80;sm_90a;compute_90", (10, 0), True),  # PTX JIT-compiles on newer GPUs
    ("sm_80;sm_90a;compute_90", (12, 0), True),
    ("sm_80;sm_90a;compute_90", (7, 5), False),
    ("sm_90a", (9, 0), True),
    ("sm_90a", (10, 0), False),  # arch-specific cubins run on that arch only
    ("compute_90a", (10, 0), False),
    ("sm_120", (12, 1), True),
    ("unknown", (7, 5), None),  # an old build that did not record its archs: cannot tell
])
def test_runs_on_follows_cuda_compatibility(archs, cc, ok):
    assert _ext.runs_on(cc, archs) is ok


class _FakeExtension:
    """Stands in for xray_ops._C: every entry point exists, archs as given."""

    def __init__(self, archs):
        self._archs = archs
        self.__file__ = "fake/_C.so"

    def cuda_archs(self):
        return self._archs

    def __getattr__(self, name):
        return lambda *a: None


@pytest.fixture
def fake_gpu(monkeypatch):
    """fake_gpu(capability, archs): CUDA "available" with that capability, the extension
    "built" for those archs; returns a maker of fake CUDA tensors."""
    def setup(cc, archs="sm_80;sm_90a;compute_90"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(_dispatch, "device_capability", lambda device: cc)
        monkeypatch.setattr(_ext, "load", lambda: _FakeExtension(archs))
        mode = FakeTensorMode(allow_non_fake_inputs=True)

        def cuda(*shape, dtype=torch.float16):
            with mode:
                return torch.empty(*shape, device="cuda", dtype=dtype)

        return cuda

    return setup


def _evit_inputs(cuda):
    return dict(x=cuda(2, 9, 16), cls_attn=cuda(2, 8), keep=3, fuse=True)


@pytest.mark.parametrize("cc,archs,picked", [
    ((9, 0), "sm_80;sm_90a;compute_90", "cuda"),
    ((8, 9), "sm_80;sm_90a;compute_90", "cuda"),
    ((7, 5), "sm_80;sm_90a;compute_90", "triton"),  # T4: no image, auto falls back
    ((10, 0), "sm_80;sm_90a", "triton"),  # Blackwell without PTX
    ((10, 0), "sm_80;sm_90a;compute_90", "cuda"),  # Blackwell JIT-compiles the PTX
])
def test_auto_falls_back_to_triton_on_gpus_the_build_did_not_target(fake_gpu, cc, archs, picked):
    cuda = fake_gpu(cc, archs)
    assert _dispatch.select("evit_select", "auto", _evit_inputs(cuda)).backend == picked
    assert _dispatch.select("tome_match", "auto", dict(
        metric=cuda(2, 9, 16), r=2, class_token=True, distill_token=False)).backend == picked
    assert _dispatch.select("quantize_per_token", "auto",
                            dict(x=cuda(4, 32))).backend == picked
    if picked == "triton":
        with pytest.raises(BackendError, match=r"forced backend 'cuda'.*no kernel image for "
                                               rf"compute capability {cc[0]}\.{cc[1]}"):
            _dispatch.select("evit_select", "cuda", _evit_inputs(cuda))


def test_minimum_compute_capability(fake_gpu):
    # a build that targets sm_75: the int8 GEMM still refuses it (cp.async / int8 mma need
    # sm_80), the plain row kernels and evit / tome take it; nothing takes sm_61
    cuda = fake_gpu((7, 5), "sm_75")
    a = cuda(16, 32, dtype=torch.int8)
    gemm = dict(a_q=a, b_q=cuda(8, 32, dtype=torch.int8), a_scale=cuda(16, 1),
                b_scale=cuda(8), bias=None, out_dtype=torch.float16, activation="none")
    assert any("needs compute capability >= 8.0, device has 7.5" in r
               for r in _dispatch.reasons_for("int8_matmul", gemm)["cuda"])
    assert _dispatch.select("int8_matmul", "auto", gemm).backend == "triton"
    assert _dispatch.reasons_for("quantize_per_token", dict(x=cuda(4, 32)))["cuda"] == []
    assert _dispatch.reasons_for("evit_select", _evit_inputs(cuda))["cuda"] == []
    cuda = fake_gpu((6, 1), "sm_61")
    assert any("needs compute capability >= 7.0, device has 6.1" in r
               for r in _dispatch.reasons_for("evit_select", _evit_inputs(cuda))["cuda"])


def test_flash_attention_cuda_on_untargeted_gpu(fake_gpu):
    cuda = fake_gpu((7, 5))
    q = cuda(2, 3, 40, 64)
    inputs = dict(q=q, k=q, v=q, key_bias=None, scale=0.125, causal=False, want_cls=True)
    reasons = _dispatch.reasons_for("flash_attention", inputs)
    assert any("needs compute capability >= 8.0" in r or "no kernel image" in r
               for r in reasons["cuda"])
    assert reasons["triton"] == []
    assert _dispatch.select("flash_attention", "auto", inputs).backend == "triton"
    cuda = fake_gpu((9, 0))
    q = cuda(2, 3, 40, 64)
    inputs = dict(q=q, k=q, v=q, key_bias=None, scale=0.125, causal=False, want_cls=True)
    assert _dispatch.reasons_for("flash_attention", inputs)["cuda"] == []


def test_runtime_limits_hold_for_every_op(toy_op, monkeypatch):
    """The Triton interpreter's bfloat16 (a runtime's limit, not an op's): any bfloat16 tensor
    or dtype input refuses it, whatever the op."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _dispatch.register(toy_op, "triton", forward=lambda x, n: x, dtypes=_dispatch.FLOATS)
    x = torch.ones(2)
    assert _dispatch.reasons_for(toy_op, (x, 1))["triton"] == []
    for inputs in ((x.bfloat16(), 1), (x, torch.bfloat16)):
        assert _dispatch.reasons_for(toy_op, inputs)["triton"] == [
            _dispatch.INTERPRETER_BF16_REASON]
    q8 = torch.ones(4, 16, dtype=torch.int8)
    with pytest.raises(BackendError, match="bfloat16 under the Triton interpreter"):
        with xo.backend("triton"):
            xo.int8_matmul(q8, q8, torch.ones(4, 1), torch.ones(4), out_dtype=torch.bfloat16)
