"""python -m bench <op|all> [--quick] | python -m bench plot | python -m bench summary --csv F
python -m bench e2e [--quick] [--models M,...] [--backends VARIANT,...] [--modes infer,train]
                    [--rounds N]
python -m bench e2e_report [--csv F]     (plots + the README table from bench/results/e2e_*.csv)

Times every available implementation of an op side by side, prints a table with ratios against
PyTorch eager, and appends the rows to bench/results/<device>.csv.
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import harness
from .ops import OPS, load

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", help=f"an op ({', '.join(OPS)}), 'all', 'plot', 'summary' "
                                "(a narrow table of --csv), 'e2e' (whole models, patched vs as "
                                "they are) or 'e2e_report' (its plots and README table)")
    p.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--modes", default=None,
                   help="comma-separated subset of fwd,bwd,fwd+bwd (e2e: of infer,train); "
                        "default all")
    p.add_argument("--backends", default=None,
                   help="comma-separated implementations to time (eager always runs)")
    p.add_argument("--csv", default=None, help="CSV to append to (default bench/results/<device>.csv)")
    p.add_argument("--no-csv", action="store_true", help="do not write results")
    p.add_argument("--out", default=None, help="plot: folder for the PNGs")
    p.add_argument("--models", default=None, help="e2e: comma-separated model keys")
    p.add_argument("--rounds", type=int, default=None,
                   help="e2e: timing rounds over all variants (default: cpu 3, quick 2; cuda 1)")
    a = p.parse_args(argv)

    if a.what == "summary":  # a narrow table of the newest rows of a results CSV
        print(harness.format_compact(harness.read_csv(a.csv or p.error("summary needs --csv"))))
        return 0
    if a.what == "e2e_report":
        from . import e2e_report

        for path in e2e_report.main(csv_path=a.csv, out_dir=a.out):
            print(path)
        return 0
    if a.what == "plot":
        from .plot import plot_all

        for path in plot_all(csv_path=a.csv, out_dir=a.out):
            print(path)
        return 0
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[a.dtype] if a.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    if a.what == "e2e":
        from .ops import e2e

        e2e_modes = [m for m in (a.modes or ",".join(e2e.MODES)).split(",") if m]
        for m in e2e_modes:
            if m not in e2e.MODES:
                p.error(f"--modes: expected a subset of {e2e.MODES} for e2e, got {m!r}")
        e2e.run(device, dtype, a.quick, models=a.models.split(",") if a.models else None,
                only=a.backends.split(",") if a.backends else None, rounds=a.rounds,
                modes=e2e_modes, write_csv=not a.no_csv, csv_file=a.csv)
        return 0
    ops = list(OPS) if a.what == "all" else [a.what]
    for op in ops:
        if op not in OPS:
            p.error(f"what: expected one of {list(OPS) + ['all', 'plot']}, got {op!r}")
    modes = [m for m in (a.modes or ",".join(harness.MODES)).split(",") if m]
    for m in modes:
        if m not in harness.MODES:
            p.error(f"--modes: expected a subset of {harness.MODES}, got {m!r}")
    backends = a.backends.split(",") if a.backends else None
    all_rows, all_cases = [], []
    for op in ops:
        mod = load(op)
        if getattr(mod, "REPORT_ONLY", False):  # accuracy reports, not timings
            mod.run_report(device, a.quick, write_csv=not a.no_csv)
            continue
        cases = mod.cases(device, dtype, a.quick)
        rows = harness.run_cases(cases, device, a.quick, modes, backends)
        all_rows += rows
        all_cases += cases
        if not a.no_csv and rows:
            path = harness.append_csv(rows, device, a.csv)
            print(f"appended {len(rows)} rows to {path}", file=sys.stderr)
    if all_rows or all_cases:
        print(f"device: {harness.device_name(device)}  torch {torch.__version__}  "
              f"commit {harness.commit()}")
        print(harness.format_table(all_rows, all_cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
