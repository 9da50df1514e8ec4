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
SEED_IMAGES = {"balloon-396x380": (396, 380), "groceries-800x534": (800, 534), "bench-2048x2048": (2048, 2048),
               "truck-1800x1200": (1800, 1200)}   # ../shared/seed-images/README.md
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


def run_script(repo: Path, tmp: Path, script: str = "gpu_validate.sh", *args: str, timeout: int = 300, **env):
    """A GPU script rehearsed (DRY=1) in `tmp`, in an environment of its own: none of this shell's
    pytest options, xdist worker, allocator settings or user profile folder."""
    full = {**os.environ, "DRY": "1", "OUT": str(tmp / "out"), "SITE": str(tmp / "site"),
            "RESULTS_DIR": str(tmp / "results"), **env}
    for k in ("PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF",
              "SD_VRAM_PROFILES"):
        full.pop(k, None)
    p = subprocess.run(["bash", str(repo / "scripts" / script), *args], cwd="/", env=full,
                       capture_output=True, text=True, timeout=timeout)
    return p, (tmp / "out" / "log.txt").read_text()


@pytest.mark.parametrize("script", ["gpu_validate.sh", "gpu_cases_validate.sh"])
def test_script_parses(script):
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], check=True)


def files_in(out: Path) -> list[str]:
    return sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())


def test_budget_step_alone_writes_the_budget_runs(repo, tmp_path):
    """Issue 10's GPU run: step M alone (SKIP=P,A,B,D), each case under its four budgets, largest
    first, each run recording its verdict's measured side (ok/oom, OOMs, retries, peak)."""
    p, log = run_script(repo, tmp_path, BUDGET_CASES="balloon-396x380", SKIP="P,A,B,D",
                        SD_VRAM_BUDGET_S="540", M_AT="520")
    assert p.returncode == 0, log[-3000:]
    assert "step M: start (until +520s" in log
    assert re.search(r"steps: M:0 P:skipped A:skipped B:skipped D:skipped$", log, re.M), log[-3000:]
    out = tmp_path / "out"
    files = [f for f in files_in(out) if f.endswith("_budgets.json")]
    assert len(files) == 1, files_in(out)
    doc = json.loads((out / files[0]).read_text())
    assert doc["schema"] == "sd-vram/budgets/1"
    runs = doc["runs"]
    assert [r["budget"] for r in runs] == ["above-full-speed", "above-allocated", "between-floor-and-full", "below-floor"]
    capacities = [r["capacity_bytes"] for r in runs]
    assert capacities == sorted(capacities, reverse=True) and len(set(capacities)) == 4
    for r in runs:
        m = r["measurement"]
        assert r["case"] == "balloon-396x380" and r["predicted"]["verdict"] in ("fits", "fits-with-fallback", "oom")
        assert m["status"] in ("ok", "oom") and {"num_ooms", "num_alloc_retries", "peak_allocated_bytes", "error"} <= set(m)


def test_dry_run_makes_every_output(repo, tmp_path):
    p, log = run_script(repo, tmp_path)
    assert p.returncode == 0, log[-3000:]
    # the shim, not an installed sd-vram, supplied the package
    assert f"sd_vram from {repo}/sd_vram/__init__.py | formula from {repo}/formula/__init__.py" in log
    assert re.search(r"steps: P:0 A:[01] B:0 D:none$", log, re.M), log[-3000:]
    # deadlines: P +45 (killed 30 s later), B +305 killed at BUDGET + 5 = +315, not +335
    assert "step P: start (until +45s, killed at +75s)" in log
    assert "step B: start (until +305s, killed at +315s)" in log
    out = tmp_path / "out"
    files = files_in(out)
    assert len(files) == 6 and all(len(Path(f).parts) <= 3 for f in files), files
    assert files[0] == "log.txt"
    docs = {f: json.loads((out / f).read_text()) for f in files[1:]}
    probe = [d for f, d in docs.items() if f.endswith("_conv_probe.json")]
    snaps = [d for f, d in docs.items() if "memhistory" in f]
    runs = [d for d in docs.values() if d["schema"] == "sd-vram/results/1"]
    assert len(probe) == 1 and len(snaps) == 3 and len(runs) == 1
    pr = probe[0]
    assert pr["schema"] == "sd-vram/conv-probe/1" and pr["complete"] and pr["environment"]["backend"] == "fake"
    assert [c["size"] for c in pr["calls"]] == "64x64,128x128,256x256,512x512,640x427,1024x1024,2048x2048".split(",")
    assert {c["status"] for c in pr["calls"]} == {"ok"} and len(pr["rows"]) > 600
    assert "[in+out+weight] at every input shape probed" in log       # the probe's summary
    assert {s["case"] for s in snaps} == {"balloon-396x380", "bench-2048x2048", "images2-1024x1024"}
    assert all(s["schema"] == "sd-vram/memhistory/1" and s["summary"]["events"] > 0 for s in snaps)
    a = runs[0]
    assert a["run"]["allocator"] == "default"
    ids = [x["id"] for x in a["cases"]]
    # the four seed images, each with the short call and the full default call, from their files
    by_id = {x["id"]: x for x in a["cases"]}
    for seed, (w, h) in SEED_IMAGES.items():
        short, full = by_id[seed], by_id[seed + "/full-call"]
        for rec in (short, full):
            assert (rec["inputs"]["width"], rec["inputs"]["height"]) == (w, h)
            assert rec["inputs"]["image"] == {"source": "file", "file": rec["inputs"]["image"]["file"]}
            assert rec["inputs"]["options"]["guidance_scale"] == 5.0 and rec["inputs"]["options"]["strength"] == 0.8
        assert short["inputs"]["options"]["num_inference_steps"] == 5
        assert full["inputs"]["options"]["num_inference_steps"] == 50 and full["inputs"]["unet_evals"] == 41
    assert not any(i.endswith("/full-call") for i in ids if i.split("/")[0] not in SEED_IMAGES)
    # full calls after every short run: they reuse them
    assert ids.index("bench-2048x2048/full-call") > ids.index("truck-4032x3024")
    # the copies in $OUT are the files in the results folder
    assert sorted(f.name for f in (tmp_path / "results").rglob("*.json")) == sorted(Path(f).name for f in files[1:])
    assert "Measured MiB" in log                      # the comparison at the end


def test_full_calls_left_to_step_d_and_expandable_segments(repo, tmp_path):
    p, log = run_script(repo, tmp_path, A_FULL_CALL="cheapest", EXPANDABLE="1", PROBE_SIZES="64x64")
    assert p.returncode == 0, log[-3000:]
    assert re.search(r"steps: P:0 A:[01] B:0 C:[01] D:[01]$", log, re.M), log[-3000:]
    assert "--cases groceries-800x534,bench-2048x2048,truck-1800x1200 --full-call all" in log
    out = tmp_path / "out"
    files = files_in(out)
    assert len(files) == 8, files  # log, probe, 3 snapshots, runs A, C, D
    runs = [json.loads((out / f).read_text()) for f in files if f.endswith(".json")]
    runs = [r for r in runs if r["schema"] == "sd-vram/results/1"]
    a, c, d = runs
    assert [x["id"] for x in a["cases"] if x["variant"] == "full"] == ["balloon-396x380/full-call"]
    assert c["run"]["allocator"] == "expandable_segments"
    assert c["environment"]["env"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert {x["id"] for x in c["cases"]} == {x["id"] for x in a["cases"]} - {"balloon-396x380/full-call"}
    d_ids = [x["id"] for x in d["cases"]]
    big = ("groceries-800x534", "bench-2048x2048", "truck-1800x1200")
    assert sorted(d_ids) == sorted([*big, *(c + "/full-call" for c in big)])
    assert all(d_ids.index(c + "/full-call") > d_ids.index(c) for c in big)   # each after its short run


def test_no_time_left_skips_every_step(repo, tmp_path):
    p, log = run_script(repo, tmp_path, SD_VRAM_BUDGET_S="0")
    assert p.returncode == 0
    assert log.count("skipped, its deadline passed") == 3 and "no archive was written" in log
    assert re.search(r"step D: skipped, -?\d+s left < D_MIN_S=120s for the full calls of "
                     r"balloon-396x380,groceries-800x534,bench-2048x2048,truck-1800x1200", log)
    assert re.search(r"steps: P:skipped A:skipped B:skipped D:skipped$", log, re.M)


def test_settings_script_runs_the_allocator_cases_under_their_settings(repo, tmp_path):
    p, log = run_script(repo, tmp_path, "gpu_cases_validate.sh", "settings", CASES="*square-512x512")
    assert p.returncode == 0, log[-3000:]
    assert re.search(r"steps: S1:[01] S2:[015] S3:0 S4:[015]$", log, re.M), log[-3000:]
    snaps = sorted((tmp_path / "out" / "results").rglob("*_memhistory_channels-last.balloon-396x380.json"))
    assert len(snaps) == 1                          # the channels_last trace (step S3)
    runs = [json.loads(f.read_text()) for f in sorted((tmp_path / "out" / "results").rglob("*.json"))
            if "_memhistory_" not in f.name]
    split = [r for r in runs if r["run"]["allocator"] == "max_split_size_mb:512"]
    assert len(split) == 1, [r["run"]["allocator"] for r in runs]
    (case,) = split[0]["cases"]
    assert case["id"] == "max-split-512.square-512x512"
    assert case["prediction"]["options"]["alloc_conf"] == "max_split_size_mb:512"
    assert split[0]["run"]["bands"] == {"peak_allocated": 0.01, "peak_reserved": 0.03, "peak_device": 0.03}
    # the settings cases are not the main script's
    assert all(not c["id"].startswith("max-split-512.") for r in runs if r is not split[0] for c in r["cases"])


def test_cases_script_wants_a_group(repo, tmp_path):
    p = subprocess.run(["bash", str(repo / "scripts" / "gpu_cases_validate.sh"), "sundry"], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().endswith("{settings|pipelines}")


def test_pipelines_script_runs_txt2img_and_inpaint_cases(repo, tmp_path):
    p, log = run_script(repo, tmp_path, "gpu_cases_validate.sh", "pipelines",
                        CASES="txt2img-512x512,inpaint-standard-balloon-396x380")
    assert p.returncode == 0, log[-3000:]
    assert re.search(r"steps: T:[01] I:[01]$", log, re.M), log[-3000:]
    runs = [json.loads(f.read_text()) for f in sorted((tmp_path / "out" / "results").rglob("*.json"))]
    ids = sorted(c["id"] for r in runs for c in r["cases"])
    assert ids == ["inpaint-standard-balloon-396x380", "txt2img-512x512"]
    by_id = {c["id"]: c for r in runs for c in r["cases"]}
    assert by_id["txt2img-512x512"]["prediction"]["options"]["pipeline"] == "txt2img"
    assert by_id["inpaint-standard-balloon-396x380"]["inputs"]["image"]["source"] == "file"
