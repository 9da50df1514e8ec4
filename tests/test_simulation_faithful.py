"""Fake execution allocates and frees exactly as real execution of the same code.

The same recorder runs the pipeline twice on the CPU at a small size: once on real tensors
(uninitialised weights: memory does not depend on values), once on fake tensors under
FakeTensorMode. Both runs use the same substitutions (simulation/call.py, patches.py), so
any difference would come from fake execution itself. SDPA is not patched on the CPU, so
both take the same CPU kernels.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def sim_both_runs():
    from sd_vram.formula.options import Options
    from sd_vram.simulation.call import record_call

    opts = Options(num_inference_steps=4, strength=0.5)         # 3 UNet evaluations
    runs = {}
    for fake in (True, False):
        rec, s, e, info = record_call(64, 96, device_type="cpu", fake=fake, options=opts,
                                      max_unet_evals=None, memo_unet=False, dtype=torch.float32)
        runs[fake] = ([(ev.kind, ev.nbytes) for ev in rec.events[s:e]],
                      [ev.op for ev in rec.events[s:e]], [ev.stage for ev in rec.events[s:e]],
                      info["unet_evals"])
    return runs


def test_fake_and_real_cpu_streams_are_identical(sim_both_runs):
    fake, real = sim_both_runs[True], sim_both_runs[False]
    assert fake[3] == real[3] == 3
    assert len(fake[0]) > 5000
    assert fake[0] == real[0]          # every allocation and free, sizes and order
    assert fake[2] == real[2]          # in the same stages


def test_operator_names_agree_except_matmul_folding(sim_both_runs):
    """The meta kernel of native_layer_norm keeps the input's strides where the CPU kernel
    returns a contiguous output, so `matmul` on that output folds to mm in the real run and
    runs bmm in the fake one: same sizes, different operator name."""
    fake_ops, real_ops = sim_both_runs[True][1], sim_both_runs[False][1]
    diff = {(f, r) for f, r in zip(fake_ops, real_ops) if f != r}
    assert diff <= {("bmm.default", "mm.default")}
