"""reference_model.train.bench (the speed goals' command) runs every mode it is asked for on a
tiny model and prints a rate and a ratio to torch eager for each; a failing mode is recorded,
not fatal. Speed itself is measured by running it, never asserted here."""

from __future__ import annotations

import csv

import torch

from reference_model.train import bench


def test_bench_quick_cpu_every_mode_has_a_rate(tmp_path, capsys):
    out = tmp_path / "rm_bench.csv"
    n = torch.get_num_threads()
    try:
        assert bench.main(["--config", "tiny", "--device", "cpu", "--img-size", "16", "--quick",
                           "--batch", "2", "--tags", "7", "--tome-r", "2", "--threads", "1",
                           "--rounds", "2", "--train-modes", "torch,xray",
                           "--infer-modes", "torch,xray_tome_int8",
                           "--csv", str(out)]) == 0
    finally:
        torch.set_num_threads(n)
    with open(out) as f:
        rows = list(csv.DictReader(f))
    got = {(r["what"], r["mode"]) for r in rows}
    assert sorted(r["round"] for r in rows) == ["0"] * 4 + ["1"] * 4  # alternating rounds
    # the other inference modes are each half of xray_tome_int8 (kept out: numba compiles)
    assert got == {("train", "torch"), ("train", "xray"), ("infer", "torch"),
                   ("infer", "xray_tome_int8")}
    for r in rows:
        assert r["note"] == "", r  # no mode failed
        assert float(r["samples_per_s"]) > 0 and r["steps"] == "2" and r["config"] == "tiny"
        assert r["mode"] == "torch" or float(r["vs_torch"]) > 0
    for r in rows:  # each ratio against the same round's torch row
        base = [b for b in rows if (b["what"], b["mode"], b["round"]) == (r["what"], "torch",
                                                                          r["round"])]
        assert abs(float(r["vs_torch"] or 1) - float(r["samples_per_s"])
                   / float(base[0]["samples_per_s"])) < 0.01 * float(r["vs_torch"] or 1)
    assert "medians of 2 rounds" in capsys.readouterr().out
