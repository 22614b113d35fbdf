"""The training loop on the stand-in model: each stage, the chain, exact resume, corrupt
checkpoints, distillation, progressive resolution."""

from __future__ import annotations

import csv
import os

import pytest
import torch

from reference_model.train import checkpoint as ckpt
from reference_model.train import train
from reference_model.train.loop import build_from_checkpoint, load_encoder_from

from reference_model.train import config as C

from .test_rm_train_standin import STANDIN_API, one_thread, standin_sources, tiny_config  # noqa: F401


def _rows(out):
    with open(os.path.join(out, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def _model_tensors(path):
    t, _ = ckpt.load_checkpoint(path)
    return {k: v for k, v in t.items() if k.startswith(("model.", "optim."))}


def test_stage_all_chain_writes_checkpoints_metrics_and_plots(tmp_path):
    cfg = tiny_config(tmp_path, stage="all")
    s = train(cfg, api=STANDIN_API, sources=standin_sources())
    assert set(s["stages"]) == {"mae", "hashtag", "clip"} and s["interrupted"] == 0
    for stage in ("mae", "hashtag", "clip"):
        st = s["stages"][stage]
        assert st["steps"] == 6 and torch.isfinite(torch.tensor(st["final_loss"]))
        assert os.path.exists(os.path.join(tmp_path, stage, "done.json"))
        for kind in ("loss", "throughput"):
            assert os.path.getsize(tmp_path / f"{stage}_{kind}.png") > 1000
    rows = _rows(tmp_path)
    assert {r["stage"] for r in rows} == {"mae", "hashtag", "clip"}
    assert all(float(r["samples_per_s"]) > 0 for r in rows)
    # the hashtag stage started from the MAE encoder: re-initialising a fresh hashtag model
    # from the MAE checkpoint gives exactly the MAE encoder's weights
    mae, _ = build_from_checkpoint(s["stages"]["mae"]["checkpoint"], api_task("mae"))
    hashtag, spec = build_from_checkpoint(s["stages"]["hashtag"]["checkpoint"],
                                          api_task("hashtag"))
    assert spec["vocab"]["tags"] and len(spec["vocab"]["tags"]) == hashtag.head.out_features
    fresh = api_task("hashtag").build(spec)
    load_encoder_from(fresh, s["stages"]["mae"]["checkpoint"])
    for (k, a), b in zip(mae.vit.state_dict().items(), fresh.vit.state_dict().values()):
        assert torch.equal(a, b), k


def api_task(stage):
    from reference_model.train.tasks import TASKS

    return TASKS[stage](STANDIN_API)


def test_resume_is_bitwise_exact(tmp_path):
    """30 steps straight == 20 steps, then a resume for the last 10 (fp32, CPU, one process):
    the model and the optimizer state are bitwise equal. The stage mixes image and video steps
    and changes resolution at step 15, and MAE draws its masks from the global RNG."""
    kw = dict(stage="mae", ckpt_every=10, keep_checkpoints=5)
    a = tiny_config(tmp_path / "a", **kw)
    a.mae.steps = 30
    train(a, api=STANDIN_API, sources=standin_sources())
    b = tiny_config(tmp_path / "b", **kw, resume=str(tmp_path / "a/mae/checkpoint-000020.safetensors"))
    b.mae.steps = 30
    s = train(b, api=STANDIN_API, sources=standin_sources())
    assert s["stages"]["mae"]["steps"] == 30
    ta = _model_tensors(tmp_path / "a/mae/checkpoint-000030.safetensors")
    tb = _model_tensors(tmp_path / "b/mae/checkpoint-000030.safetensors")
    assert ta.keys() == tb.keys() and any(k.startswith("optim.") for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    # the resumed run's metrics pick up at step 21
    assert int(_rows(tmp_path / "b")[0]["step"]) == 21


def test_corrupt_or_truncated_checkpoint_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, stage="mae", ckpt_every=3)
    train(cfg, api=STANDIN_API, sources=standin_sources())
    good, last = ckpt.list_checkpoints(tmp_path / "mae")[-2:]
    blob = open(last, "rb").read()
    with open(last, "wb") as f:  # truncated
        f.write(blob[: len(blob) // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
        ckpt.load_checkpoint(last)
    flipped = bytearray(blob)
    flipped[-5] ^= 0xFF  # one byte of a tensor
    with open(last, "wb") as f:
        f.write(bytes(flipped))
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.load_checkpoint(last)
    # --resume (auto) refuses it too, naming it; the previous checkpoint is intact
    cfg2 = tiny_config(tmp_path, stage="mae", resume="auto")
    os.remove(tmp_path / "mae" / "done.json")
    with pytest.raises(ckpt.CheckpointError, match=os.path.basename(last)):
        train(cfg2, api=STANDIN_API, sources=standin_sources())
    ckpt.load_checkpoint(good)


def test_atomic_save_leaves_the_previous_file_when_writing_fails(tmp_path, monkeypatch):
    p = str(tmp_path / "checkpoint-000001.safetensors")
    ckpt.save_checkpoint(p, {"a": torch.ones(3)}, {"step": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(p, {"a": torch.zeros(3)}, {"step": 2})
    monkeypatch.undo()
    t, meta = ckpt.load_checkpoint(p)
    assert meta["step"] == 1 and torch.equal(t["a"], torch.ones(3))
    assert os.listdir(tmp_path) == ["checkpoint-000001.safetensors"]


def test_progressive_resolution_changes_token_count_and_keeps_training(tmp_path):
    cfg = tiny_config(tmp_path, stage="hashtag", log_every=1)
    cfg.hashtag.steps, cfg.hashtag.video_every = 8, 0
    cfg.hashtag.batch_size = 16
    train(cfg, api=STANDIN_API, sources=standin_sources())
    rows = _rows(tmp_path)
    tokens = [int(r["tokens"]) for r in rows]
    sizes = [int(r["img_size"]) for r in rows]
    batches = [int(r["batch_size"]) for r in rows]
    assert sizes[:4] == [8] * 4 and sizes[4:] == [16] * 4
    assert tokens[0] == 5 and tokens[-1] == 17
    assert batches[0] == 16 and batches[-1] == 16 * 5 // 17  # batch x tokens kept flat
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows)


@pytest.mark.parametrize("stage", ["hashtag", "clip"])
def test_distillation_step_lowers_the_distillation_loss(tmp_path, stage):
    """A teacher (a wider model, trained a few steps) and a student: one optimizer step on the
    distillation loss alone lowers it on the same batch."""
    from reference_model.train.loop import load_teacher
    from reference_model.train.optim import build_optimizer
    from reference_model.train.sampler import default_collate
    from reference_model.train.config import DistillConfig

    tcfg = tiny_config(tmp_path / "t", stage=stage, model_overrides={"dim": 48})
    train(tcfg, api=STANDIN_API, sources=standin_sources())
    task = api_task(stage)
    teacher = load_teacher(str(tmp_path / "t"), task, torch.device("cpu"), ops="xray")
    src = standin_sources()
    student_spec = task.spec(tiny_config(tmp_path / "s", stage=stage), [src["image"]])
    student_spec = task.adapt_to_teacher(student_spec, teacher)
    from reference_model.train.tasks import annotate
    from reference_model.train.dist import Dist

    torch.manual_seed(0)
    student = annotate(task.build(student_spec), student_spec)
    batch = default_collate([src["image"][i] for i in range(16)])
    x = batch["image"]
    d = Dist(0, 1, 0, torch.device("cpu"))
    dcfg = DistillConfig(teacher="x", weight=1.0, temperature=2.0)
    opt = build_optimizer(student, "adamw", 1e-4, 0.0)

    def dl():
        _, out = task.loss(student, student, x, batch, d)
        return task.distill_loss(out, teacher, x, batch, dcfg)

    before = dl()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = dl()
    assert before.item() > 0 and after.item() < before.item()


@pytest.mark.parametrize("setting", [{"accum": 2}, {"grad_checkpointing": True}])
def test_accumulation_and_checkpointing_give_the_plain_run(tmp_path, setting):
    """Two micro-batches per step, or activation checkpointing in the blocks, train the same
    weights as the plain run (hashtag stage: no random masks; AdamW: no sign() flips)."""
    kw = dict(stage="hashtag", optimizer="adamw")
    plain = tiny_config(tmp_path / "plain", **kw)
    other = tiny_config(tmp_path / "other", **kw, **setting)
    for c in (plain, other):
        c.hashtag.steps, c.hashtag.video_every = 3, 0
        c.hashtag.phases = [C.Phase(0.0, 16, 2)]
    a = train(plain, api=STANDIN_API, sources=standin_sources(video=False))
    b = train(other, api=STANDIN_API, sources=standin_sources(video=False))
    ta, tb = _model_tensors(a["stages"]["hashtag"]["checkpoint"]), \
        _model_tensors(b["stages"]["hashtag"]["checkpoint"])
    for k in ta:
        if k.startswith("model."):
            torch.testing.assert_close(ta[k], tb[k], atol=1e-5, rtol=1e-4, msg=k)
    if "accum" in setting:  # and the runs did differ in how they computed it
        assert _rows(tmp_path / "other")[0]["batch_size"] == "8"
