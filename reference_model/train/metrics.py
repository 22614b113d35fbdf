"""Training metrics: DIR/metrics.csv (one row per logged step), TensorBoard when installed, a
progress bar (tqdm: loss, samples/s, ETA) and per-stage loss / throughput plots (PNG)."""

from __future__ import annotations

import csv
import os
import sys

COLUMNS = ("stage", "step", "loss", "loss_task", "loss_distill", "lr", "samples_per_s",
           "source", "img_size", "clip_len", "batch_size", "tokens", "elapsed_s")


class MetricsLog:
    """Appends rows to ``out/metrics.csv`` (and TensorBoard under ``out/tb``) on the main rank."""

    def __init__(self, out: str, enabled: bool = True):
        self.path = os.path.join(out, "metrics.csv")
        self.enabled = enabled
        self._tb = None
        if enabled:
            os.makedirs(out, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(out, "tb"))
            except ImportError:  # tensorboard is optional
                self._tb = None

    def truncate(self, stage: str, after_step: int) -> None:
        """Drop rows of ``stage`` past ``after_step`` (a resumed run rewrites them)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        rows = read_metrics(self.path)
        rows = [r for r in rows if not (r["stage"] == stage and int(r["step"]) > after_step)]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            w.writeheader()
            w.writerows(rows)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: _fmt(row.get(k, "")) for k in COLUMNS})
        if self._tb is not None:
            for k in ("loss", "loss_task", "loss_distill", "lr", "samples_per_s", "tokens"):
                if row.get(k, "") != "":
                    self._tb.add_scalar(f"{row['stage']}/{k}", float(row[k]), int(row["step"]))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def read_metrics(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_stage(metrics_csv: str, stage: str, out_dir: str) -> list[str]:
    """``<stage>_loss.png`` and ``<stage>_throughput.png`` from the CSV rows of ``stage``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_csv) if r["stage"] == stage]
    if not rows:
        return []
    steps = [int(r["step"]) for r in rows]
    paths = []
    for key, ylabel, name in (("loss", "loss", "loss"),
                              ("samples_per_s", "samples / s", "throughput")):
        vals = [float(r[key]) if r[key] not in ("", "nan") else float("nan") for r in rows]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, vals, lw=1.2, label=key)
        if key == "loss" and any(r["loss_distill"] not in ("", "0") for r in rows):
            ax.plot(steps, [float(r["loss_distill"] or "nan") for r in rows], lw=1,
                    label="distillation")
            ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{stage}: {ylabel}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = os.path.join(out_dir, f"{stage}_{name}.png")
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


class Progress:
    """A tqdm bar on a terminal (loss, samples/s, ETA); a line every ``every`` steps otherwise."""

    def __init__(self, stage: str, total: int, start: int, enabled: bool, every: int):
        self.stage, self.total, self.every, self.enabled = stage, total, every, enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=stage, unit="step",
                            dynamic_ncols=True, leave=True)

    def update(self, step: int, loss: float, sps: float | None, extra: str = "") -> None:
        """One step done; ``sps`` (samples/s) is given on the steps that measured it."""
        if not self.enabled:
            return
        if sps is not None:
            self.sps = sps
        sps = getattr(self, "sps", float("nan"))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss {loss:.4f} | {sps:.1f} samples/s {extra}", refresh=False)
        elif step % self.every == 0 or step == self.total:
            print(f"[{self.stage}] step {step}/{self.total} loss {loss:.4f} "
                  f"{sps:.1f} samples/s {extra}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
