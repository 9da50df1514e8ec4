"""Fixtures shared by the tests."""

import pytest

from sd_vram.formula import allocconf


@pytest.fixture(autouse=True)
def not_an_xdist_worker(monkeypatch):
    """Under `pytest -n`, this process is an xdist worker; the sessions and scripts a test starts
    are not (the plugin names its archives and pins GPUs by PYTEST_XDIST_WORKER)."""
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def no_shell_alloc_conf(monkeypatch):
    """The CLI applies the shell's allocator settings (cli.with_environment); not this shell's."""
    for name in allocconf.ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
