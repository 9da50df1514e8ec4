"""scripts/gpu_probe_validate.sh rehearsed on the CPU (DRY=1: fake backends), on a copy of the
checkout that is not installed, as on the GPU machine."""

from __future__ import annotations

import json
import re
import subprocess

from test_plugin_script import files_in, repo, run_script  # noqa: F401  (the fixture)


def test_script_parses():
    from test_plugin_script import ROOT

    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_probe_validate.sh")], check=True)


def test_dry_run_predicts_with_both_probed_profiles(repo, tmp_path):  # noqa: F811
    p, log = run_script(repo, tmp_path, "gpu_probe_validate.sh", timeout=600, CASES="balloon-396x380,square-768x768")
    assert p.returncode == 0, log[-3000:]
    assert re.search(r"steps: P1:0 A1:[01] P2:0 A2:[01] B:0$", log, re.M), log[-3000:]
    out = tmp_path / "out"
    files = files_in(out)
    profiles = [json.loads((out / f).read_text()) for f in files if "/profiles/" in f]
    runs = [json.loads((out / f).read_text()) for f in files if f.endswith(".json") and "/profiles/" not in f]
    assert sorted(p["name"] for p in profiles) == ["h200-probe", "h200-probe-default-sizes", "h200-probe-stack2"]
    assert all(p["source"] == "probe" for p in profiles)
    by_name = {p["name"]: p for p in profiles}
    assert "396x380" in by_name["h200-probe-default-sizes"]["measured"]["sizes"]       # the seed images
    assert by_name["h200-probe-stack2"]["stack"]["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert by_name["h200-probe"]["stack"]["CUBLAS_WORKSPACE_CONFIG"] is None
    assert len(runs) == 2
    first, second = sorted(runs, key=lambda r: r["run"]["started_utc"])
    assert first["prediction_profile"]["name"] == "h200-probe" and first["prediction_profile"]["source"] == "probe"
    assert second["prediction_profile"]["name"] == "h200-probe-stack2"
    assert second["environment"]["env"]["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert {c["id"] for c in first["cases"]} == {"balloon-396x380", "square-768x768"}
    assert "predicted with h200-probe (source probe)" in log
