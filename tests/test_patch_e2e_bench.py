"""The end-to-end benchmark's machinery (bench/ops/e2e.py, bench/e2e_report.py) on a tiny timm
model: every variant builds and runs, rows carry agreement and memory, the CSV round-trips
into the README table and the plots. Timings are not checked (speed is measured, not
asserted)."""

import pytest
import torch

from bench import e2e_report
from bench.ops import e2e

timm = pytest.importorskip("timm")


def _tiny():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64)


def test_rows_csv_readme_and_plots(tmp_path, monkeypatch):
    monkeypatch.setattr(e2e.harness, "time_ms", lambda fn, device, quick: (fn(), 1.0)[1])
    spec = e2e.ModelSpec("tiny", "timm", _tiny, 2, 3, {"infer": 2, "train": 2}, img_size=64)
    rows = e2e.run_model(spec, "cpu", torch.float32, True, rounds=1,
                         only=["xray-attn", "xray-tome8", "xray-evit", "xray-int8", "tome-r8"],
                         progress=lambda s: None)
    by = {(r.variant, r.mode): r for r in rows}
    assert {v for v, _ in by} == {"eager", "xray-attn", "xray-tome8", "xray-evit", "xray-int8",
                                  "tome-r8"}
    assert by["eager", "infer"].speedup == 1.0 and by["eager", "infer"].cosine == 1.0
    assert by["xray-attn", "infer"].cosine > 0.9999
    assert 0.9 < by["xray-tome8", "infer"].cosine < 1.0  # merging changes the output a little
    assert by["xray-int8", "train"].note == "int8 is inference only"
    assert by["xray-int8", "infer"].peak_mb < by["eager", "infer"].peak_mb  # int8 weights
    for mode in e2e.MODES:
        assert by["xray-evit", mode].samples_per_s == 2 / 1.0 * 1e3
        assert by["xray-evit", mode].peak_mb > 0
    csv_file = tmp_path / "e2e_cpu_test.csv"
    e2e.append_csv(rows, "cpu", str(csv_file))
    newest = e2e_report.newest_rows(str(csv_file))
    assert len(newest) == len(rows)
    table = e2e_report.markdown(newest, "cpu_test")
    assert "| tiny | xray-tome8 |" in table and "int8 is inference only" in table
    pngs = e2e_report.plot(newest, "cpu_test", str(tmp_path))
    assert [p.rsplit("__", 1)[1] for p in pngs] == ["infer.png", "train.png"]
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{e2e_report.BEGIN}\nold\n{e2e_report.END}\ntail\n")
    e2e_report.update_readme(table, str(readme))
    text = readme.read_text()
    assert "old" not in text and "| tiny | eager |" in text and text.endswith("tail\n")


def test_reference_rows_are_skipped_with_the_reason_until_it_exists():
    specs = e2e._reference_specs({"infer": 1, "train": 1})
    try:
        import reference_model  # noqa: F401
    except ImportError:
        assert all("reference_model is not importable" in s.skip for s in specs)
        rows = e2e.run_model(specs[0], "cpu", torch.float32, True, 1, progress=lambda s: None)
        assert rows and all(r.ms is None and r.note == specs[0].skip for r in rows)
    else:
        assert not any(s.skip for s in specs)


def test_modes_select_inference_only_and_bad_modes_are_refused(monkeypatch):
    """``--modes infer``: the CPU goals' rows without the (slow) training steps."""
    from bench.__main__ import main

    monkeypatch.setattr(e2e.harness, "time_ms", lambda fn, device, quick: (fn(), 1.0)[1])
    spec = e2e.ModelSpec("tiny", "timm", _tiny, 2, 3, {"infer": 2, "train": 2}, img_size=64)
    rows = e2e.run_model(spec, "cpu", torch.float32, True, rounds=1, only=["xray-attn"],
                         progress=lambda s: None, modes=("infer",))
    assert {(r.variant, r.mode) for r in rows} == {("eager", "infer"), ("xray-attn", "infer")}
    with pytest.raises(SystemExit):
        main(["e2e", "--device", "cpu", "--modes", "fwd", "--no-csv"])
