"""The sd-vram test suite, parametrized by the plugin (pytest_generate_tests):

- test_case: one catalogue case on the GPU (`pytest --gpu`), id = the case's name.
- test_full_default_call: a seed case with the full default call (strength 0.8, 50 steps);
  it must reach the same peak_allocated in the same stage as the short run.
- test_archived: the current equation against one archived GPU measurement (no GPU needed),
  id = <gpu-model>/<case>.

Collected through tests/test_plugin_suite.py (`from sd_vram.plugin.suite import *`).
"""

import pytest

__all__ = ["test_case", "test_full_default_call", "test_archived"]


@pytest.mark.gpu
def test_case(sd_case, sd_vram_suite, request):
    sd_vram_suite.run_case(sd_case, request.node)


@pytest.mark.gpu
def test_full_default_call(sd_full_case, sd_vram_suite, request):
    sd_vram_suite.run_full_call(sd_full_case, request.node)


@pytest.mark.sd_vram_archived
def test_archived(sd_archived, sd_vram_suite, request):
    sd_vram_suite.check_archived(sd_archived, request.node)
