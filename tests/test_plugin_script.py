"""scripts/gpu_validate.sh rehearsed on the CPU (DRY=1: fake measurement backend).

It runs on a copy of the checkout that is not installed, as on the GPU machine, so the
import shim is what makes `sd_vram` importable; device time is too scarce to find a typo there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ["sd_vram", "formula", "plugin", "simulation", "cases", "scripts", "conftest.py", "pyproject.toml",
          "tests/test_plugin_suite.py"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    dst = tmp_path_factory.mktemp("checkout")
    for name in NEEDED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    return dst


def run_script(repo: Path, tmp: Path, **env):
    full = {**os.environ, "DRY": "1", "OUT": str(tmp / "out"), "SITE": str(tmp / "site"),
            "RESULTS_DIR": str(tmp / "results"), **env}
    full.pop("PYTEST_ADDOPTS", None)
    full.pop("PYTEST_XDIST_WORKER", None)
    p = subprocess.run(["bash", str(repo / "scripts" / "gpu_validate.sh")], cwd="/", env=full,
                       capture_output=True, text=True, timeout=300)
    return p, (tmp / "out" / "log.txt").read_text()


def test_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_validate.sh")], check=True)


def test_dry_run_makes_every_output(repo, tmp_path):
    p, log = run_script(repo, tmp_path)
    assert p.returncode == 0, log[-3000:]
    # the shim, not an installed sd-vram, supplied the package
    assert f"sd_vram from {repo}/sd_vram/__init__.py | formula from {repo}/formula/__init__.py" in log
    assert re.search(r"steps: A:[01] B:0 C:[01] D:[01]$", log, re.M), log[-3000:]
    out = tmp_path / "out"
    files = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    assert len(files) <= 8 and all(len(Path(f).parts) <= 3 for f in files), files
    assert files[0] == "log.txt"
    runs = [json.loads((out / f).read_text()) for f in files if f.endswith(".json") and "memhistory" not in f]
    snaps = [json.loads((out / f).read_text()) for f in files if "memhistory" in f]
    assert len(runs) == 3 and {s["case"] for s in snaps} == {"balloon-640x427", "truck-4032x3024"}
    assert all(s["schema"] == "sd-vram/memhistory/1" and s["summary"]["events"] > 0 for s in snaps)
    a, c, d = runs
    assert {r["run"]["allocator"] for r in runs} == {"default", "expandable_segments"}
    assert c["run"]["allocator"] == "expandable_segments"
    assert c["environment"]["env"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    catalogue_ids = {x["id"] for x in a["cases"]}
    assert "balloon-640x427/full-call" in catalogue_ids and "truck-4032x3024" in catalogue_ids
    assert {x["id"] for x in c["cases"]} == catalogue_ids - {"balloon-640x427/full-call"}
    assert {x["id"] for x in d["cases"] if x["variant"] == "full"} == {
        "groceries-800x533/full-call", "bench-3840x2560/full-call", "truck-4032x3024/full-call"}
    # the copies in $OUT are the archives in the results folder
    assert sorted(f.name for f in (tmp_path / "results").rglob("*.json")) == sorted(Path(f).name for f in files[1:])
    assert "Measured MiB" in log                      # the comparison at the end


def test_no_time_left_skips_every_step(repo, tmp_path):
    p, log = run_script(repo, tmp_path, SD_VRAM_BUDGET_S="0")
    assert p.returncode == 0
    assert log.count("skipped, its deadline passed") == 4 and "no archive was written" in log
