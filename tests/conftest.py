"""Fixtures shared by the tests of the command line."""

import pytest

from sd_vram.formula import allocconf


@pytest.fixture
def no_shell_alloc_conf(monkeypatch):
    """The CLI applies the shell's allocator settings (cli.with_environment); not this shell's."""
    for name in allocconf.ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
