"""Installing and running the tests: the nightly GPU workflow keeps the runner's torch, and a
checkout that is not pip-installed runs `pytest` (conftest.py maps the package folders)."""

from __future__ import annotations

import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _extras() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _requirements(extra: str, extras: dict) -> set[str]:
    """Every requirement an extra pulls in, through sd-vram[...] references."""
    out = set()
    for req in extras[extra]:
        m = re.fullmatch(r"sd-vram\[([\w-]+)\]", req)
        out |= _requirements(m.group(1), extras) if m else {req}
    return out


def test_nightly_gpu_workflow_does_not_pin_torch():
    text = (ROOT / ".github" / "workflows" / "nightly-gpu.yml").read_text()
    installs = re.findall(r'pip install [^\n]*"\.\[([\w,-]+)\]"', text)
    assert installs, "the workflow installs the project with an extra"
    extras = _extras()
    for group in installs:
        reqs = set().union(*(_requirements(e, extras) for e in group.split(",")))
        assert not [r for r in reqs if re.match(r"torch\b", r) and "==" in r], reqs
        assert {"pytest>=8", "pytest-benchmark", "nvidia-ml-py"} <= reqs   # what pytest --gpu needs
    assert "torch==2.13.0" in _requirements("test", extras)   # the CPU suite keeps its pin


@pytest.fixture
def bare_checkout(tmp_path):
    """A copy of the checkout, no egg-info, no __pycache__: nothing installs it."""
    dst = tmp_path / "checkout"
    for name in ("sd_vram", "formula", "plugin", "simulation", "cases", "tests"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("conftest.py", "pyproject.toml"):
        shutil.copy2(ROOT / name, dst)
    return dst


def _pytest_without_sd_vram(checkout: Path, *args):
    """pytest where sd-vram is not installed: -S skips site (and the editable install's .pth
    finder); PYTHONPATH still gives pytest, PIL and numpy. No plugin autoload: the installed
    sd-vram's pytest11 entry point would load it from the worktree."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(site.getsitepackages()),
           "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "HOME": str(checkout)}
    return subprocess.run([sys.executable, "-S", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                           *args], cwd=str(checkout), env=env, capture_output=True, text=True, timeout=300)


def test_pytest_runs_in_a_checkout_that_is_not_installed(bare_checkout):
    probe = bare_checkout / "tests" / "test_where.py"
    probe.write_text("import sd_vram.cli, sd_vram.plugin.cases, sd_vram.formula\n"
                     "def test_where():\n"
                     f"    assert sd_vram.plugin.cases.__file__ == {str(bare_checkout / 'plugin' / 'cases.py')!r}\n"
                     f"    assert sd_vram.formula.__file__ == {str(bare_checkout / 'formula' / '__init__.py')!r}\n")
    r = _pytest_without_sd_vram(bare_checkout, "tests/test_where.py", "tests/test_plugin_cases.py")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "No module named" not in r.stdout + r.stderr
    r = _pytest_without_sd_vram(bare_checkout, "--help")
    assert "--gpu" in r.stdout                        # the plugin's options are there


def test_ci_runs_the_readme_test_command():
    """.ci/run's last line is the README's test command (run as python3 -m, quietly)."""
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("Install the test dependencies"):]
    command = re.search(r"```bash\n(.+)\n```", block).group(1)
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci.replace("python3 -m ", "").replace(" -q", "") == command
