"""The benchmark harness: timing every mode, CSV columns, the table and the plot step."""

import csv
import os

import torch

from bench import harness
from bench.ops import OPS, load


def _tiny_case():
    def make():
        x = torch.randn(4, 9, 8, requires_grad=True)
        a = torch.rand(4, 8, requires_grad=True)
        return x, a

    def eager(x, a):
        return (x[:, 1:] * a[..., None]).sum(1)

    return harness.Case("toy", "B=4", torch.float32, make,
                        {"eager": eager, "other": lambda x, a: eager(x, a) * 1.0},
                        bytes={"fwd": 4 * 9 * 8 * 4}, flops={"fwd": 1e3})


def test_run_cases_csv_table_and_plot(tmp_path, monkeypatch):
    case = _tiny_case()
    rows = harness.run_cases([case], "cpu", quick=True, progress=False)
    assert {(r.mode, r.backend) for r in rows} == {(m, b) for m in harness.MODES
                                                   for b in ("eager", "other")}
    assert all(r.ms > 0 for r in rows)
    fwd = [r for r in rows if r.mode == "fwd"]
    assert all(r.gbps and r.tflops for r in fwd)
    path = harness.append_csv(rows, "cpu", str(tmp_path / "dev.csv"))
    with open(path) as f:
        got = list(csv.DictReader(f))
    assert list(got[0].keys()) == harness.CSV_COLUMNS
    assert len(got) == len(rows) and got[0]["torch"] == torch.__version__
    back = harness.read_csv(path)
    assert {(r.mode, r.backend) for r in back} == {(r.mode, r.backend) for r in rows}
    compact = harness.format_compact(back)
    assert "xEager" in compact and len(compact.splitlines()) == len(rows) + 1
    table = harness.format_table(rows, [case])
    assert "vs eager" in table and "1.00x" in table
    from bench.plot import plot_csv

    pngs = plot_csv(path, str(tmp_path))
    assert pngs and all(os.path.getsize(p) > 1000 for p in pngs)


def test_table_ratio_against_best_sdpa_peer():
    rows = [harness.Row("attn", "fwd", "N=197", "bf16", name, ms, None, None)
            for name, ms in (("eager", 4.0), ("sdpa-flash", 2.0), ("sdpa-math", 3.0),
                             ("triton", 1.0))]
    table = harness.format_table(rows)
    assert "vs SDPA" in table
    line = next(l for l in table.splitlines() if " triton " in l)
    assert line.split()[-2:] == ["4.00x", "2.00x"]


def test_failing_implementation_is_reported_not_fatal():
    case = _tiny_case()

    def broken(x, a):
        raise RuntimeError("kernel exploded")

    case.impls["broken"] = broken
    rows = harness.run_cases([case], "cpu", quick=True, modes=("fwd",), progress=False)
    assert {r.backend for r in rows} == {"eager", "other"}
    assert "kernel exploded" in case.skipped["broken/fwd"]


def test_every_registered_op_builds_its_cases_on_cpu():
    for op in OPS:
        mod = load(op)
        if getattr(mod, "REPORT_ONLY", False):  # an accuracy report (trains a model): no cases
            assert callable(mod.run_report)
            continue
        cases = mod.cases("cpu", torch.float32, quick=True)
        assert cases, op
        for c in cases:
            assert "eager" in c.impls


def test_cpu_timing_runs_on_the_threads_torch_is_set_to():
    # torch.utils.benchmark.Timer defaults to one thread: a PyTorch baseline timed that way
    # ran on 1 core while the numba kernels used all of them (ratios inflated up to 2x).
    old = torch.get_num_threads()
    seen = []
    try:
        torch.set_num_threads(2)
        harness.time_ms(lambda: seen.append(torch.get_num_threads()), "cpu", quick=True)
    finally:
        torch.set_num_threads(old)
    assert seen and set(seen) == {2}


def test_percent_of_peak_columns_on_a_device_with_known_ceilings():
    h200 = "NVIDIA_H200"
    rows = [harness.Row("evit_select", "fwd", "B=64", "bf16", "eager", 2.0, 1075.0, None, h200),
            harness.Row("evit_select", "fwd", "B=64", "bf16", "cuda", 1.0, 2150.0, None, h200),
            harness.Row("int8_linear", "fwd", "M=1576", "bf16", "eager", 1.0, None, 395.0, h200)]
    table = harness.format_table(rows)
    assert "%BW" in table and "%TFLOP" in table
    line = next(l for l in table.splitlines() if " cuda " in l)
    assert "50.0%" in line and line.split()[-1] == "2.00x"
    assert "50.0%" in next(l for l in table.splitlines() if "int8_linear" in l)
    compact = harness.format_compact(rows)
    assert "%peak" in compact and "50.0%" in compact and "25.0%" in compact
    # no ceilings known for this CPU: no % columns
    cpu = [harness.Row(r.op, r.mode, r.shape, r.dtype, r.backend, r.ms, r.gbps, r.tflops, "cpu_x")
           for r in rows]
    assert "%BW" not in harness.format_table(cpu)


def test_fwd_bwd_timing_draws_the_output_gradients_once(monkeypatch):
    # drawing them (torch.randn_like) inside the timed step timed the random number generator
    # too: ~20 ms a step for layer_norm's two outputs on the CPU, more than the op itself
    draws, steps = [], []
    real = harness._grad_targets
    monkeypatch.setattr(harness, "_grad_targets", lambda out: draws.append(1) or real(out))
    case = _tiny_case()
    impl = case.impls["eager"]
    ms = harness.measure(case, lambda *a: steps.append(1) or impl(*a), "fwd+bwd", "cpu",
                         quick=True)
    assert ms > 0 and len(steps) > 2 and len(draws) == 1
