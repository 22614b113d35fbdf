"""torchrun on the CPU (gloo), 2 processes: DDP and FSDP2 give the one-process result on the
global batch (the CLIP loss gathers embeddings with gradients), and their checkpoints load and
resume in one process."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch

from reference_model.train import checkpoint as ckpt
from reference_model.train.loop import build_from_checkpoint

from .test_rm_train_cli import ROOT, _env

# the CLIP stage (gathered contrastive loss + caption-siamese term), image and video steps,
# AdamW (Lion's sign() would turn rounding differences near zero into whole steps)
ARGS = ["--config", "tiny", "--stage", "clip", "--steps", "3", "--device", "cpu",
        "--optimizer", "adamw", "data_size=64", "log_every=1", "clip.phases=[[0, 16, 2]]",
        "clip.batch_size=8", "clip.video_every=2"]


def _losses(out):
    with open(os.path.join(out, "metrics.csv")) as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def _train_here(*args):
    """The CLI's config, trained in this process (one thread: saves a subprocess start)."""
    from reference_model.train import train
    from reference_model.train.__main__ import config_from_args

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(config_from_args(list(args)))
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    _train_here(*ARGS, "--out", str(out))
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_torchrun_matches_one_process(tmp_path, one_process, parallel):
    out = tmp_path / parallel
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", "-m", "reference_model.train", *ARGS,
                        "--parallel", parallel, "--out", str(out)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # the logged loss is the mean of the ranks' local losses: the global loss
    assert _losses(out) == pytest.approx(_losses(one_process), rel=1e-4)
    final = "clip/checkpoint-000003.safetensors"
    a, meta = ckpt.load_checkpoint(out / final)
    b, _ = ckpt.load_checkpoint(one_process / final)
    assert meta["world"] == 2 and "rng.1.torch" in a
    for k in b:
        if k.startswith(("model.", "optim.")):
            # AdamW's first steps are nearly sign(g): rounding differences in tiny gradient
            # entries move a weight by a fraction of lr (1e-3)
            torch.testing.assert_close(a[k], b[k], atol=3e-4, rtol=0, msg=k)
    # the distributed checkpoint loads in one process, and training resumes from it there
    model, spec = build_from_checkpoint(str(out / final))
    assert spec["stage"] == "clip" and not model.training
    s = _train_here(*[x if x != "3" else "4" for x in ARGS], "--out", str(tmp_path / "resumed"),
                    "--resume", str(out / final))
    assert s["stages"]["clip"]["steps"] == 4 and s["world"] == 1
    assert [int(r["step"]) for r in csv.DictReader(open(tmp_path / "resumed/metrics.csv"))] == [4]
