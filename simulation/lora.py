"""The call's LoRA adapters on the simulated device, loaded through the real diffusers and peft code.

``loaded_lora`` runs ``pipe.load_lora_weights(state_dict)`` (and ``pipe.fuse_lora()`` with
lora_fused) after the weights are resident, so the adapters reach the device as peft puts
them there (tuners_utils._move_adapter_to_device_of_base_layer: each lora_A, lora_B in
model.modules() order, cast to the base layer's fp16), fusing's delta weights are recorded,
and the call then runs peft's own lora.Linear.forward. The state dict has the shapes of
options.adapters (formula/lora.py: from RANK[:TARGETS] or the LoRA file's header), zeros on
the CPU as a file loads (memory does not depend on values). Then ``empty_cache``, as the GPU
suite empties the cache before each case. Afterwards the adapters are unloaded
(``pipe.unload_lora_weights()``): the meta pipeline is shared.

FakeTensorMode steps aside during the load: peft creates the adapters under
init_empty_weights on the meta device, and a fake meta tensor would be moved (and fail
Module._apply's tensor swap) where a real one is skipped. Operations on the fake weights
still run in their own fake mode; the CPU-to-device copies of the real CPU state dict go
through it explicitly (_to_simulated_device); fuse_lora runs in the fake mode.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .patches import patch_attr, patched_tensor_methods
from .recorder import MemoryRecorder


def lora_state_dict(lora, device="cpu", dtype=torch.float16, make=torch.zeros) -> dict:
    """A peft-format state dict (unet.<module>.lora_A.weight ...) of the adapters' shapes."""
    return {key: make(shape, dtype=dtype, device=device) for key, shape in lora.state_dict_shapes().items()}


@contextlib.contextmanager
def _to_simulated_device(fake_mode, recorder: MemoryRecorder):
    """Tensor.to(cuda) of a real CPU tensor: the copy a GPU makes, as a fake device tensor."""
    from torch._subclasses.fake_tensor import FakeTensor

    inner = torch.Tensor.to

    def to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is None or device.type != "cuda" or isinstance(self, FakeTensor):
            return inner(self, *args, **kwargs)
        with fake_mode:
            out = torch.ops.aten._to_copy(self, dtype=dtype or self.dtype, device=device)
        recorder.track(out, op="lora:_to_copy")
        return out

    # Module._apply swaps a fake parameter for its moved copy (torch.utils.swap_tensors), which
    # refuses a tensor that something holds a weak reference to; the fake mode's converter
    # memoizes its outputs in a WeakValueDictionary (a real tensor has no such reference).
    # Its entries for the two tensors are dropped first: nothing converts them again.
    memo = fake_mode.fake_tensor_converter.meta_converter.tensor_memo
    swap = torch.utils.swap_tensors

    def swap_unmemoized(t1, t2):
        for key in [k for k, v in list(memo.items()) if v is t1 or v is t2]:
            del memo[key]
        return swap(t1, t2)

    with patch_attr(torch.Tensor, "to", to), patch_attr(torch.utils, "swap_tensors", swap_unmemoized):
        yield


@contextlib.contextmanager
def _environ(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


@contextlib.contextmanager
def _no_progress_bar():
    from transformers.utils import logging as transformers_logging

    was = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            transformers_logging.enable_progress_bar()


@contextlib.contextmanager
def loaded_lora(pipe, recorder: MemoryRecorder, options):
    lora = options.adapters
    if lora is None:
        yield
        return
    import transformers.modeling_utils as tmu
    from diffusers.utils import logging as diffusers_logging
    from torch.utils._python_dispatch import _disable_current_modes

    fake_mode = pipe.unet.conv_in.weight.fake_mode     # the fake weights' mode (resident_setup)
    recorder.set_stage("weights")
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()     # "No LoRA keys associated to CLIPTextModel": true, and noise
    try:
        with contextlib.ExitStack() as es:
            es.enter_context(_disable_current_modes())
            state_dict = lora_state_dict(lora)        # real CPU tensors, as a file loads
            es.enter_context(patched_tensor_methods(recorder, True, "cuda"))
            es.enter_context(_to_simulated_device(fake_mode, recorder))
            # transformers' load_adapter (the text encoder's adapters) first reserves memory with
            # caching_allocator_warmup (modeling_utils.py: one torch.empty, freed at once), sized
            # from torch.cuda.mem_get_info, which a CPU-only torch cannot answer; its block is a
            # whole free segment, which the empty_cache below releases: left out.
            es.enter_context(patch_attr(tmu, "caching_allocator_warmup", lambda *a, **k: None))
            # Its copies of the state dict to the device run in a thread pool unless
            # HF_DEACTIVATE_ASYNC_LOAD (core_model_loading.py); a fake mode is not thread-safe,
            # so they run in order here (the same tensors; a GPU may make them in another order).
            es.enter_context(_environ("HF_DEACTIVATE_ASYNC_LOAD", "1"))
            es.enter_context(_no_progress_bar())      # its "Loading weights" bar
            with recorder:
                pipe.load_lora_weights(state_dict)
            del state_dict
        if options.lora_fused:
            # B @ A on the fake weights, in their mode; without grad mode (the adapters are
            # trainable parameters: a CPU-only torch's autograd kernel wants a CUDA device
            # guard), which changes no allocation: .data += delta records no graph
            with recorder, torch.no_grad():
                pipe.fuse_lora()
        recorder.empty_cache("lora")
        diffusers_logging.set_verbosity(verbosity)
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)
        pipe.unload_lora_weights()
