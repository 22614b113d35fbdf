"""xray-train from the command line (real tiny model): one-line errors before any work, and
SIGTERM mid-run leaving a checkpoint that resumes."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest

from reference_model.train import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a small run of the real tiny model: 16 px images, 4-frame clips, 64 synthetic samples
SMALL = ["--device", "cpu", "data_size=64", "log_every=1",
         "mae.phases=[[0, 16, 2]]", "hashtag.phases=[[0, 16, 2]]", "clip.phases=[[0, 16, 2]]",
         "mae.batch_size=8", "hashtag.batch_size=8", "clip.batch_size=8"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "reference_model.train", *args], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, needle", [
    (["--stpes", "3"], "unrecognized arguments: --stpes"),
    (["--stage", "pretrain"], "argument --stage: invalid choice: 'pretrain'"),
    (["--data", "/no/such/folder"], "--data: '/no/such/folder' is neither"),
    (["--config", "/no/such.yaml"], "--config /no/such.yaml: no such file"),
    (["mae.stepz=3"], "unknown key 'mae.stepz'"),
    (["--resume", "/no/ckpt.safetensors"], "resume: no such checkpoint '/no/ckpt.safetensors'"),
    (["--steps", "0"], "mae.steps: expected an integer >= 1, got 0"),
    (["--device", "tpu"], "device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
])
def test_bad_command_lines_fail_with_one_line_before_any_work(tmp_path, capsys, args, needle):
    from reference_model.train.__main__ import main

    out = tmp_path / "run"
    assert main([*args, "--out", str(out)]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("xray-train: error:"), lines
    assert needle in lines[0]
    assert not out.exists()  # nothing started


def test_unreadable_yaml_config_is_one_line_from_the_shell(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\nmae: [unclosed\n")
    r = run_cli("--config", str(bad), "--out", str(tmp_path / "run"), timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("xray-train: error: --config ") and "cannot read it" in lines[0]
    assert not (tmp_path / "run").exists()


def test_sigterm_mid_run_leaves_a_checkpoint_that_resumes(tmp_path):
    out = tmp_path / "run"
    args = ["--config", "tiny", "--stage", "hashtag", "--steps", "400", "--out", str(out), *SMALL]
    p = subprocess.Popen([sys.executable, "-m", "reference_model.train", *args], cwd=ROOT,
                         env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.csv"
    deadline = time.time() + 180
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:  # 2 steps done
            break
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()[1]
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err
    found = ckpt.list_checkpoints(out / "hashtag")
    assert len(found) == 1 and not (out / "hashtag" / "done.json").exists()
    _, meta = ckpt.load_checkpoint(found[0])
    stopped = meta["step"]
    assert 2 <= stopped < 400 and meta["positions"]["image"] > 0
    # resume: finish the stage, with fewer steps than planned so the test stays short
    r = run_cli(*args[:args.index("--steps")], "--steps", str(stopped + 3),
                *args[args.index("--steps") + 2:], "--resume")
    assert r.returncode == 0, r.stderr
    assert f"resumed from {found[0]} at step {stopped}/{stopped + 3}" in r.stdout + r.stderr
    with open(metrics) as f:
        steps = [int(row["step"]) for row in csv.DictReader(f)]
    assert steps == list(range(1, stopped + 4))  # no duplicated or missing rows
    assert (out / "hashtag" / "done.json").exists()
