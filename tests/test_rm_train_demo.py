"""`make demo` end to end in its smoke mode (--quick): summary.json has every key of the issue."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from reference_model import demo

EVAL = {"zero_shot_top1", "zero_shot_chance", "i2t_r1", "t2i_r1", "retrieval_chance_r1",
        "video_top1", "video_chance", "hashtag_map"}


def test_quick_demo_writes_summary_with_every_key(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "ensure_data_packages", lambda: ({"openclipart": False,
                                                                "fashion-mnist": False}, []))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        demo.run(str(tmp_path), device="cpu", quick=True)
    finally:
        torch.set_num_threads(n)
    with open(tmp_path / "summary.json") as f:
        s = json.load(f)
    assert {"config", "device", "data", "stages", "eval", "eval_int8", "eval_tome", "eval_evit",
            "speed"} <= set(s)
    assert s["config"] == "tiny"
    assert set(s["stages"]) == {"mae", "hashtag", "clip"}
    for st in s["stages"].values():
        assert {"steps", "final_loss", "seconds"} <= set(st) and st["steps"] == 2
        assert math.isfinite(st["final_loss"])
    for block in ("eval", "eval_int8", "eval_tome", "eval_evit"):
        assert EVAL <= set(s[block]), block
        assert all(0.0 <= s[block][k] <= 1.0 for k in EVAL), s[block]
    assert {"index_int8", "index_pca_int8"} <= set(s["eval_index"])
    assert set(s["speed"]["train_samples_per_s"]) == {"xray", "torch"}
    assert {"xray", "torch", "xray_tome", "xray_evit", "xray_int8"} <= set(
        s["speed"]["infer_samples_per_s"])
    assert all(v > 0 for v in s["speed"]["infer_samples_per_s"].values())
    for p in ("mae_loss.png", "hashtag_throughput.png", "clip_loss.png", "speed.png"):
        assert os.path.getsize(tmp_path / p) > 1000


def test_interrupted_training_stops_the_demo(tmp_path, monkeypatch):
    """SIGTERM during training: train() returns with a checkpoint and the signal; the demo exits
    with 128 + signal instead of evaluating a half-trained model."""
    import reference_model.eval as ev
    import reference_model.train as tr

    monkeypatch.setattr(demo, "ensure_data_packages", lambda: ({"openclipart": False,
                                                                "fashion-mnist": False}, []))
    monkeypatch.setattr(tr, "train", lambda cfg, sources=None: {"interrupted": 15, "stages": {}})
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: pytest.fail("evaluated after SIGTERM"))
    with pytest.raises(SystemExit) as e:
        demo.run(str(tmp_path), device="cpu", quick=True)
    assert e.value.code == 128 + 15
    assert not (tmp_path / "summary.json").exists()
