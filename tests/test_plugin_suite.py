"""Collects the sd-vram GPU suite and the archived-results regression (see sd_vram/plugin/suite.py).

`pytest --gpu` measures every catalogue case on the GPU; plain `pytest` skips those and
re-checks the current equation against results/.
"""

from sd_vram.plugin.suite import *  # noqa: F401,F403
