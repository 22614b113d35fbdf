"""xray_ops.optim.Lion: N steps of every backend against N steps of the reference update and of
lion-pytorch's formula, on a mixed set of parameter shapes and dtypes; and the
torch.optim.Optimizer contract (state_dict, param groups, schedulers, closures, sparse grads)."""

import copy

import pytest
import torch

import xray_ops as xo
from xray_ops.reference import lion as ref
from xray_ops.testing import assert_close_to_reference

from .matrix import device_backends

CPU_BACKENDS = ("torch", "cpu", "triton")
GPU_BACKENDS = ("torch", "triton", "cuda")
# a scalar, one element, odd sizes, a matrix not a multiple of any block, a 3-D tensor
SHAPES = [(), (1,), (7,), (3, 5), (2, 3, 4), (67, 33), (1031,)]
STEPS = 5
HP = dict(lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1)
# (param dtype, state dtype) pairs a backend must handle
DTYPE_PAIRS = [(torch.float32, None), (torch.float32, torch.bfloat16),
               (torch.bfloat16, torch.float32), (torch.bfloat16, None), (torch.float16, None)]


def _params(device, dtype):
    torch.manual_seed(1)
    return [torch.nn.Parameter(torch.randn(s, device=device).to(dtype)) for s in SHAPES]


def _grads(device, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g).to(device) for s in SHAPES]


def _lion_pytorch_update(p, g, m, lr, wd, b1, b2):
    """lion-pytorch's update_fn (installed) on float64 copies."""
    lp = pytest.importorskip("lion_pytorch.lion_pytorch")
    lp.update_fn(p, g, m, lr, wd, b1, b2)


def _run_steps(backend, device, dtype, state_dtype):
    params = _params(device, dtype)
    opt = xo.optim.Lion(params, **HP, state_dtype=state_dtype)
    with xo.backend(backend):
        for step in range(STEPS):
            for p, g in zip(params, _grads(device, step)):
                p.grad = g.to(dtype)
            opt.step()
    return params, [opt.state[p]["exp_avg"] for p in params]


@pytest.mark.parametrize("device,backend", device_backends(cpu=CPU_BACKENDS, gpu=GPU_BACKENDS))
@pytest.mark.parametrize("dtype,state_dtype", DTYPE_PAIRS,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_steps_match_reference_and_lion_pytorch(device, backend, dtype, state_dtype):
    if backend == "cpu" and (dtype != torch.float32 or state_dtype not in (None, torch.float32)):
        pytest.skip("the numba backend takes float32 / float64 tensors (its reasons are tested "
                    "in test_forced_backend_reasons)")
    if backend == "cuda" and dtype == torch.float16:
        pytest.skip("the CUDA kernel takes float32 / bfloat16 parameters (fp16: Triton)")
    if backend == "triton" and device == "cpu" and torch.bfloat16 in (dtype, state_dtype):
        pytest.skip("the Triton interpreter truncates float32 -> bfloat16 (no round to nearest "
                    "even); bfloat16 runs in the gpu-marked cases")
    params, states = _run_steps(backend, device, dtype, state_dtype)
    assert xo.last_backend("lion") == backend
    sd = state_dtype or dtype
    # the oracle: the same steps in float64 with lion-pytorch's formula, rounding p and m to
    # their storage dtypes after each step as every backend does
    ref_p = [p.detach().double() for p in _params(device, dtype)]
    ref_m = [torch.zeros_like(p) for p in ref_p]
    # the budget: the reference update (xray_ops.reference.lion) run in the storage dtypes
    base_p = [p.detach().clone() for p in _params(device, dtype)]
    base_m = [torch.zeros_like(p, dtype=sd) for p in base_p]
    b1, b2 = HP["betas"]
    for step in range(STEPS):
        for i, g in enumerate(_grads(device, step)):
            g = g.to(dtype)
            _lion_pytorch_update(ref_p[i], g.double(), ref_m[i], HP["lr"], HP["weight_decay"],
                                 b1, b2)
            ref_p[i] = ref_p[i].to(dtype).double()
            ref_m[i] = ref_m[i].to(sd).double()
            ref.lion_update_(base_p[i], g, base_m[i], HP["lr"], b1, b2, HP["weight_decay"])
    for i, s in enumerate(SHAPES):
        assert params[i].dtype == dtype and states[i].dtype == sd
        # one rounding of p (or m) per step in its storage dtype; a sign flip of a near-zero
        # momentum would move p by 2·lr and fail this
        ulp = torch.finfo(dtype).eps * 2 * STEPS
        assert_close_to_reference(params[i].detach(), ref_p[i], base_p[i], name=f"param{s}",
                                  atol=ulp * 4)
        assert_close_to_reference(states[i], ref_m[i], base_m[i], name=f"exp_avg{s}",
                                  atol=torch.finfo(sd).eps * 4)


def test_lion_pytorch_optimizer_same_trajectory():
    lp = pytest.importorskip("lion_pytorch")
    model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.GELU(), torch.nn.Linear(13, 3))
    twin = copy.deepcopy(model)
    ours = xo.optim.Lion(model.parameters(), **HP)
    theirs = lp.Lion(twin.parameters(), **HP)
    x, y = torch.randn(16, 7), torch.randn(16, 3)
    for _ in range(4):
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _train(opt, params, steps, first_step=0):
    for step in range(first_step, first_step + steps):
        for p, g in zip(params, _grads("cpu", step)):
            p.grad = g.to(p.dtype)
        opt.step()


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_state_dict_round_trip(state_dtype):
    a = _params("cpu", torch.float32)
    opt_a = xo.optim.Lion(a, **HP, state_dtype=state_dtype)
    _train(opt_a, a, 4)
    b = _params("cpu", torch.float32)
    opt_b = xo.optim.Lion(b, **HP, state_dtype=state_dtype)
    _train(opt_b, b, 2)
    saved = copy.deepcopy(opt_b.state_dict())
    c = [torch.nn.Parameter(p.detach().clone()) for p in b]
    opt_c = xo.optim.Lion(c, lr=1.0, state_dtype=state_dtype)  # hyper-parameters come back too
    opt_c.load_state_dict(saved)
    assert opt_c.param_groups[0]["lr"] == HP["lr"]
    for p in c:
        assert opt_c.state[p]["exp_avg"].dtype == (state_dtype or torch.float32)
    _train(opt_c, c, 2, first_step=2)
    for pa, pc in zip(a, c):
        torch.testing.assert_close(pa, pc, rtol=0, atol=0)


def test_param_groups_scheduler_and_closure():
    w = torch.nn.Parameter(torch.zeros(5))
    b = torch.nn.Parameter(torch.zeros(3))
    frozen = torch.nn.Parameter(torch.ones(2))  # no gradient: untouched
    opt = xo.optim.Lion([{"params": [w]}, {"params": [b, frozen], "lr": 0.5}], lr=0.1,
                        betas=(0.0, 0.0))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def closure():
        opt.zero_grad()
        loss = -(w.sum() + 2 * b.sum())  # gradients -1 and -2: sign -1, p moves up by lr
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 0.0
    torch.testing.assert_close(w, torch.full((5,), 0.1))
    torch.testing.assert_close(b, torch.full((3,), 0.5))
    sched.step()  # lr halves in both groups
    opt.step(closure)
    torch.testing.assert_close(w, torch.full((5,), 0.15))
    torch.testing.assert_close(b, torch.full((3,), 0.75))
    torch.testing.assert_close(frozen, torch.ones(2))
    assert frozen not in opt.state


def test_weight_decay_is_decoupled_and_scaled_by_lr():
    p = torch.nn.Parameter(torch.full((4,), 2.0))
    opt = xo.optim.Lion([p], lr=0.1, weight_decay=0.5, betas=(0.0, 0.0))
    p.grad = torch.zeros(4)  # sign(0) = 0: only the decay acts
    opt.step()
    torch.testing.assert_close(p, torch.full((4,), 2.0 * (1 - 0.1 * 0.5)))


def test_non_contiguous_param_and_grad():
    base = torch.randn(6, 4)
    p = torch.nn.Parameter(base.T)  # a transposed parameter
    q = torch.nn.Parameter(base.T.clone())
    opt, twin = xo.optim.Lion([p], **HP), xo.optim.Lion([q], **HP)
    g = torch.randn(6, 4).T
    p.grad, q.grad = g, g.contiguous()
    opt.step()
    twin.step()
    torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_sparse_gradients_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = xo.optim.Lion(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="Lion does not support sparse gradients"):
        opt.step()


def test_bad_hyper_parameters():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="lr: expected a number in"):
        xo.optim.Lion(p, lr=-1.0)
    with pytest.raises(ValueError, match=r"betas\[1\]: expected a number in \[0.0, 1.0\]"):
        xo.optim.Lion(p, betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="betas: expected a pair"):
        xo.optim.Lion(p, betas=0.9)
    with pytest.raises(ValueError, match="weight_decay: expected a number in"):
        xo.optim.Lion(p, weight_decay=-0.1)
    with pytest.raises(ValueError, match="state_dtype: expected None, torch.float32"):
        xo.optim.Lion(p, state_dtype=torch.float16)
    opt = xo.optim.Lion(p)
    with pytest.raises(ValueError, match="lr: expected a number in"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": -2.0})


def test_opcheck():
    ps = [torch.randn(5), torch.randn(2, 3)]
    gs = [torch.randn(5), torch.randn(2, 3)]
    ms = [torch.randn(5), torch.randn(2, 3)]
    for backend in ("torch", "cpu"):  # the op machinery; kernels are tested above
        torch.library.opcheck(torch.ops.xray_ops.lion_.default,
                              ([p.clone() for p in ps], gs, [m.clone() for m in ms], 1e-3, 0.9,
                               0.99, 0.1, backend))


def test_auto_picks_and_forced_backend_reasons():
    p = torch.nn.Parameter(torch.randn(5))
    opt = xo.optim.Lion([p], **HP)
    p.grad = torch.randn(5)
    opt.step()
    assert xo.last_backend("lion") == "cpu"  # numba on the CPU
    q = torch.nn.Parameter(torch.randn(5))
    opt = xo.optim.Lion([q], **HP, state_dtype=torch.bfloat16)
    q.grad = torch.randn(5)
    opt.step()
    assert xo.last_backend("lion") == "torch"  # bf16 state: the reference
    with pytest.raises(xo.BackendError, match="forced backend 'cpu'.*exp_avgs dtype bfloat16 "
                                              "differs from the params' float32"):
        with xo.backend("cpu"):
            opt.step()
    # the error describes the tensor lists briefly
    with pytest.raises(xo.BackendError, match=r"(?s)lion: .*'cuda'.*params +TensorList\(1 "
                                              r"tensors, float32, cpu\)"):
        with xo.backend("cuda"):
            opt.step()


def test_lion_op_under_torch_compile_fullgraph():
    from xray_ops.ops.lion import lion_step

    def step(ps, gs, ms):
        lion_step(ps, gs, ms, 0.01, 0.9, 0.99, 0.1)
        return sum(p.sum() for p in ps)

    ps = [torch.randn(5), torch.randn(3, 4)]
    gs = [torch.randn(5), torch.randn(3, 4)]
    ms = [torch.randn(5), torch.randn(3, 4)]
    want_p, want_m = [p.clone() for p in ps], [m.clone() for m in ms]
    for p, g, m in zip(want_p, gs, want_m):
        ref.lion_update_(p, g, m, 0.01, 0.9, 0.99, 0.1)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(ps, gs, ms)
    for a, b in zip(ps + ms, want_p + want_m):
        torch.testing.assert_close(a, b)
