"""Draw PNGs from the benchmark CSVs: speedup over eager per shape and implementation."""

from __future__ import annotations

import csv
import dataclasses
import glob
import os

from .harness import BASELINE, CSV_COLUMNS, RESULTS_DIR, read_csv


def plot_csv(path: str, out_dir: str | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        reader = csv.DictReader(f)
        if not set(CSV_COLUMNS) <= set(reader.fieldnames or ()):
            return []  # not a timing CSV (e.g. int8_accuracy.csv)
    rows = [dataclasses.asdict(r) for r in read_csv(path)]
    out_dir = out_dir or os.path.dirname(path)
    os.makedirs(out_dir, exist_ok=True)
    device = os.path.splitext(os.path.basename(path))[0]
    written = []
    for op, mode, dtype in sorted({(r["op"], r["mode"], r["dtype"]) for r in rows}):
        sel = [r for r in rows if (r["op"], r["mode"], r["dtype"]) == (op, mode, dtype)]
        shapes = sorted({r["shape"] for r in sel})
        backends = sorted({r["backend"] for r in sel} - {BASELINE})
        base = {r["shape"]: float(r["ms"]) for r in sel if r["backend"] == BASELINE}
        if not base or not backends:
            continue
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(shapes) * max(1, len(backends)) / 2), 4))
        width = 0.8 / len(backends)
        for i, b in enumerate(backends):
            ms = {r["shape"]: float(r["ms"]) for r in sel if r["backend"] == b}
            xs = [k + i * width for k, s in enumerate(shapes) if s in ms and s in base]
            ys = [base[s] / ms[s] for s in shapes if s in ms and s in base]
            ax.bar(xs, ys, width, label=b)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(shapes))])
        ax.set_xticklabels(shapes, rotation=20, ha="right", fontsize=7)
        ax.set_ylabel(f"speedup over {BASELINE}")
        ax.set_title(f"{op} {mode} {dtype} on {device}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = os.path.join(out_dir, f"{device}__{op}__{mode.replace('+', '_')}__{dtype}.png")
        fig.savefig(name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def plot_all(csv_path: str | None = None, out_dir: str | None = None) -> list[str]:
    paths = [csv_path] if csv_path else sorted(glob.glob(os.path.join(RESULTS_DIR, "*.csv")))
    written = []
    for p in paths:
        written += plot_csv(p, out_dir)
    return written
