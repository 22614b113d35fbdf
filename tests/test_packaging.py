"""The source distribution is complete whatever the machine that builds it: every csrc/ source
and every header they include (so `pip install xray_ops-*.tar.gz` on a GPU machine can build
the extension), the Triton kernels and the LICENSE, also when the CUDA build is skipped."""

import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = (".cpp", ".cu")
HEADERS = (".h", ".cuh")
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def _project_files() -> list[str]:
    """What a fresh clone holds (tracked files, and new ones not ignored)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [f for f in out.stdout.splitlines() if os.path.isfile(os.path.join(ROOT, f))]


def _includes(path: str, names: set[str]) -> list[str]:
    """Project headers that csrc file `path` includes, as csrc-relative paths; the include
    dirs are the file's own folder and csrc/ (setup.py's include_dirs)."""
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    found = []
    for inc in INCLUDE.findall(text):
        for cand in (os.path.normpath(os.path.join(os.path.dirname(path), inc)),
                     os.path.normpath(os.path.join("csrc", inc))):
            if cand in names:
                found.append(cand)
                break
        else:
            raise AssertionError(f"{path} includes {inc!r}, found nowhere in csrc/")
    return found


@pytest.mark.parametrize("skip_cuda", ["1", "0"], ids=["cuda-build-skipped", "default"])
def test_sdist_holds_every_csrc_source_and_header(tmp_path, skip_cuda):
    files = _project_files()
    src = tmp_path / "src"
    for f in files:  # a clean copy: the build writes egg-info next to setup.py
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), src / f)
    env = dict(os.environ, XRAY_OPS_SKIP_CUDA_BUILD=skip_cuda)
    res = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
                         cwd=src, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    (tarball,) = (tmp_path / "dist").iterdir()
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
        top = names[0].split("/")[0]
        shipped = {n[len(top) + 1:] for n in names if n.startswith(top + "/")}
        pkg_info = tar.extractfile(f"{top}/PKG-INFO").read().decode()

    csrc = {f for f in files if f.startswith("csrc/") and f.endswith(SOURCES + HEADERS)}
    assert any(f.endswith(SOURCES) for f in csrc) and any(f.endswith(HEADERS) for f in csrc)
    missing = sorted(csrc - shipped)
    assert not missing, f"csrc files missing from the sdist: {missing}"
    needed = {h for f in csrc for h in _includes(f, csrc)}
    assert needed and not sorted(needed - shipped), sorted(needed - shipped)
    kernels = {f for f in files if f.startswith("kernels/") and f.endswith(".py")}
    assert kernels and kernels <= shipped, sorted(kernels - shipped)
    assert {"LICENSE", "setup.py", "pyproject.toml", "MANIFEST.in"} <= shipped
    assert re.search(r"^License(-Expression)?: BSD-3-Clause$", pkg_info, re.M), pkg_info[:800]
    assert not any(n.endswith((".so", ".o")) for n in shipped)
