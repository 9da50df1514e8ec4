"""The real-GPU backend's code path (plugin/gpu.py) run on the CPU.

CUDA's memory counters and NVML are replaced by scripted stand-ins and the pipeline is a
tiny SD-shaped one on the CPU, so every line of the measurement (stage hooks, peaks per
stage, NVML sampling, SDPA backend recording, forced backends, OOM recovery, safety-checker
and VAE toggles) runs here. Nothing about real memory is asserted: that is `pytest --gpu`'s job.
"""

from __future__ import annotations

import gc
import os
import sys
import types

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from sd_vram.plugin.cases import Case, synthetic_image  # noqa: E402

TINY = {
    "unet": {"act_fn": "silu", "attention_head_dim": 2, "block_out_channels": [32, 64], "cross_attention_dim": 32,
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "in_channels": 4, "layers_per_block": 1,
             "norm_num_groups": 32, "out_channels": 4, "sample_size": 8,
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]},
    "vae": {"act_fn": "silu", "block_out_channels": [32, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
            "in_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 32, "out_channels": 3,
            "sample_size": 64, "up_block_types": ["UpDecoderBlock2D"] * 2, "scaling_factor": 0.18215},
    "text_encoder": {"hidden_act": "quick_gelu", "hidden_size": 32, "intermediate_size": 64, "layer_norm_eps": 1e-05,
                     "max_position_embeddings": 77, "num_attention_heads": 4, "num_hidden_layers": 2,
                     "projection_dim": 32, "vocab_size": 49408, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
    "safety_checker": {"projection_dim": 32,
                       "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                                       "num_hidden_layers": 1},
                       "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                                         "num_hidden_layers": 1, "patch_size": 14, "image_size": 224,
                                         "num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05}},
}

MiB = 1 << 20


class FakeCuda:
    """Scripted allocator counters: each reading of max_memory_allocated grows, so stages differ."""

    def __init__(self):
        self.allocated = 100 * MiB
        self.peak = self.allocated
        self.reads = 0

    def max_allocated(self, *a):
        self.reads += 1
        self.peak += MiB * self.reads
        return self.peak

    def reset(self, *a):
        self.peak = self.allocated


@pytest.fixture
def fake_gpu(monkeypatch):
    import sd_vram.models as models

    full = models.sd15_config()
    monkeypatch.setattr(models, "sd15_config", lambda: {**full, **TINY})
    fc = FakeCuda()
    from sd_vram.plugin import gpu

    # CudaBackend collects garbage between cases so that a real GPU's freed blocks are gone;
    # FakeCuda counts no tensor, and each full collection of the test process costs ~0.3 s
    monkeypatch.setattr(gpu, "gc", types.SimpleNamespace(collect=lambda *a: 0, freeze=gc.freeze, unfreeze=gc.unfreeze))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # tiny ops: threads only contend
    c = torch.cuda
    monkeypatch.setattr(c, "init", lambda: None)
    monkeypatch.setattr(c, "synchronize", lambda *a: None)
    monkeypatch.setattr(c, "empty_cache", lambda: None)
    monkeypatch.setattr(c, "reset_peak_memory_stats", fc.reset)
    monkeypatch.setattr(c, "max_memory_allocated", fc.max_allocated)
    monkeypatch.setattr(c, "max_memory_reserved", lambda *a: fc.peak + 20 * MiB)
    monkeypatch.setattr(c, "memory_allocated", lambda *a: fc.allocated)
    monkeypatch.setattr(c, "memory_reserved", lambda *a: fc.allocated + 20 * MiB)
    monkeypatch.setattr(c, "memory_stats", lambda *a: {"num_alloc_retries": 0, "num_ooms": 0})
    monkeypatch.setattr(c, "mem_get_info", lambda *a: (70_000 * MiB, 80_000 * MiB))
    monkeypatch.setattr(c, "get_allocator_backend", lambda: "native")
    props = types.SimpleNamespace(name="NVIDIA Fake H100", uuid="1234abcd-0000-0000-0000-000000000000",
                                  total_memory=80_000 * MiB, major=9, minor=0, multi_processor_count=132)
    monkeypatch.setattr(c, "get_device_properties", lambda *a: props)

    used = {"v": 500 * MiB}

    def mem(handle, version=None):
        used["v"] += MiB              # NVML readings grow, as a loading context does
        return types.SimpleNamespace(used=used["v"], total=80_000 * MiB)

    nv = types.ModuleType("pynvml")
    nv.nvmlMemory_v2 = 2
    nv.nvmlInit = lambda: None
    nv.nvmlDeviceGetCount = lambda: 2
    nv.nvmlDeviceGetHandleByIndex = lambda i: f"h{i}"
    nv.nvmlDeviceGetUUID = lambda h: {"h0": "GPU-ffff0000-0000-0000-0000-000000000000",
                                      "h1": "GPU-1234abcd-0000-0000-0000-000000000000"}[h]
    nv.nvmlDeviceGetMemoryInfo = mem
    nv.nvmlDeviceGetComputeRunningProcesses = lambda h: [types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=7 * MiB)]
    nv.nvmlSystemGetDriverVersion = lambda: "999.1"
    nv.nvmlSystemGetCudaDriverVersion_v2 = lambda: 13000
    nv.nvmlSystemGetNVMLVersion = lambda: "13.999"
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    yield fc
    torch.set_num_threads(threads)


def _case(name, **opts):
    base = {"guidance_scale": 5.0, "num_images_per_prompt": 1, "strength": 1.0, "num_inference_steps": 2,
            "attention": "auto", "attention_slicing": None, "vae_slicing": False, "vae_tiling": False,
            "safety_checker": True, "output_type": "pil", "dtype": "fp32"}   # the backend's (fp32 on CPUs)
    return Case(name=name, width=64, height=48, prompt="a cat", options={**base, **opts})


def test_cuda_backend_code_path_on_cpu(fake_gpu):
    from sd_vram.plugin import gpu

    # fp32: fp16 convolutions are very slow on CPUs.
    b = gpu.CudaBackend(monitor=gpu.NvmlMonitor(), device="cpu", warmup=True, dtype=torch.float32)
    # Matched by UUID, not index: torch's device is NVML's second one.
    assert b.gpu["uuid"] == "GPU-1234abcd-0000-0000-0000-000000000000" and b.gpu["nvml_matched"]
    assert b.gpu["slug"] == "Fake-H100"
    # attention="efficient" puts memory-efficient first and keeps the other backends enabled
    # (formula/kernels.py): on the CPU, which has no such kernel, the call falls back to math
    assert [w["status"] for w in b.warmup] == ["ok", "ok", "ok"]
    for key in ("cuda_context_bytes", "context_and_handles_bytes", "cublas_workspace_allocated_bytes",
                "weights_allocated_bytes", "context_after_warmup_bytes"):
        assert key in b.hardware
    assert b.environment["driver"] == "999.1" and b.environment["env"] is not None
    assert b.environment["sdp"]["fp16_bf16_reduction_math_sdp_allowed"] in (True, False)

    case = _case("c")
    m = b.measure(case, synthetic_image(64, 48, "c"))
    assert m["status"] == "ok", m["error"]
    assert m["stage_order"] == ["setup", "text_encoder", "vae_encode", "unet", "vae_decode", "safety_checker"]
    assert m["unet_evals"] == case.unet_evals == 3
    assert m["peak_stage"] == max(m["stages"], key=lambda s: m["stages"][s]["allocated_bytes"])
    assert m["peak_allocated_bytes"] == max(s["allocated_bytes"] for s in m["stages"].values())
    # every stage timed (the full call's time is foreseen from the UNet stage's)
    assert set(m["stage_seconds"]) == set(m["stages"]) and all(v >= 0 for v in m["stage_seconds"].values())
    assert sum(m["stage_seconds"].values()) <= m["wall_s"] + 0.01
    assert m["peak_device_bytes"] > 0 and m["peak_device_v1_bytes"] > 0 and m["nvml_samples"] >= 2
    assert m["peak_process_bytes"] == 7 * MiB
    stages_with_sdpa = {e["stage"] for e in m["sdpa"]}
    assert {"text_encoder", "unet", "vae_encode", "vae_decode", "safety_checker"} <= stages_with_sdpa
    assert all(e["calls"] >= 1 and e["backend"] for e in m["sdpa"])

    # Forced math backend, no safety checker (moved off the device), latent output, VAE savers.
    m = b.measure(_case("d", attention="math", safety_checker=False, vae_tiling=True, vae_slicing=True,
                        num_images_per_prompt=2, attention_slicing="auto"), synthetic_image(64, 48, "d"))
    assert m["status"] == "ok", m["error"]
    assert "safety_checker" not in m["stages"] and b.pipe.safety_checker is None
    assert {e["backend"] for e in m["sdpa"]} == {"MATH"}
    m = b.measure(_case("e", output_type="latent"), synthetic_image(64, 48, "e"))
    assert m["stage_order"] == ["setup", "text_encoder", "vae_encode", "unet"]
    assert b.pipe.safety_checker is not None          # back for a case that wants it

    # Out of memory in the UNet: recorded, scheduler state dropped, the next case runs.
    orig = b.pipe.unet.forward

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 128.00 GiB")

    b.pipe.unet.forward = oom
    m = b.measure(_case("f"), synthetic_image(64, 48, "f"))
    assert m["status"] == "oom" and "128.00 GiB" in m["error"]
    b.pipe.unet.forward = orig
    assert b.pipe.scheduler.ets == []
    assert b.measure(_case("g"), synthetic_image(64, 48, "g"))["status"] == "ok"

    # --scheduler: the case's scheduler from the pipeline's config, its state dropped after the
    # call; pndm goes back to the pipeline's own scheduler object.
    pndm = b.pipe.scheduler
    for name, cls, state in (("dpm++2m", "DPMSolverMultistepScheduler", "model_outputs"),
                             ("unipc", "UniPCMultistepScheduler", "model_outputs"),
                             ("euler-a", "EulerAncestralDiscreteScheduler", None)):
        case = _case(f"s-{name}", scheduler=name)
        m = b.measure(case, synthetic_image(64, 48, case.name))
        assert m["status"] == "ok", m["error"]
        assert type(b.pipe.scheduler).__name__ == cls and m["unet_evals"] == case.unet_evals == 2
        assert b.pipe.scheduler.config.beta_schedule == pndm.config.beta_schedule == "scaled_linear"
        if state:
            assert all(t is None for t in getattr(b.pipe.scheduler, state))
        if name == "unipc":
            assert b.pipe.scheduler.last_sample is None
    assert b.measure(_case("h"), synthetic_image(64, 48, "h"))["status"] == "ok" and b.pipe.scheduler is pndm
    assert b.capacity() == 70_000 * MiB + fake_gpu.allocated + 20 * MiB

    # A case of another dtype runs on the pipeline rebuilt in it, warmed up in it.
    m = b.measure(_case("h", dtype="bf16"), synthetic_image(64, 48, "h"))
    assert m["status"] == "ok", m["error"]
    assert b.pipe.unet.dtype == b.pipe.vae.dtype == b.pipe.safety_checker.dtype == torch.bfloat16
    assert {e["dtype"] for e in m["sdpa"]} == {"torch.bfloat16"}
    assert [w["case"] for w in b.warmup][-3:] == [f"warmup-{a}-64x64-bf16" for a in ("auto", "efficient", "math")]
    assert set(b.hardware["weights_allocated_bytes_by_dtype"]) == {"fp32", "bf16"}
    b.close()


def test_xformers_case_skipped_without_xformers_and_enabled_with_it(fake_gpu, monkeypatch):
    """attention="xformers": skipped with the reason when xformers does not import; with an
    importable xformers, diffusers' enable_xformers_memory_efficient_attention() runs before the
    call, its processor does the UNet's and VAE's attention, and the pipeline's own processors
    are back afterwards."""
    from diffusers.models import attention_processor as ap

    from sd_vram.plugin import gpu

    # bf16: xformers is modelled for 2-byte dtypes (the CPU runs bf16 too)
    b = gpu.CudaBackend(monitor=gpu.NvmlMonitor(), device="cpu", warmup=False, dtype=torch.bfloat16)
    before = {k: type(p) for k, p in b.pipe.unet.attn_processors.items()}
    monkeypatch.setitem(sys.modules, "xformers", None)           # import xformers raises ImportError
    m = b.measure(_case("xf", attention="xformers", dtype="bf16"), synthetic_image(64, 48, "xf"))
    assert m["status"] == "skipped" and "xformers does not import" in m["error"]

    calls = []

    def memory_efficient_attention(q, k, v, attn_bias=None, op=None, scale=None):
        calls.append(tuple(q.shape))   # not through F.scaled_dot_product_attention: the suite records those
        scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
        return scores.softmax(-1) @ v

    xf = types.ModuleType("xformers")
    xf.__version__ = "0.0.35"
    xf.ops = types.ModuleType("xformers.ops")
    xf.ops.memory_efficient_attention = memory_efficient_attention
    monkeypatch.setitem(sys.modules, "xformers", xf)
    monkeypatch.setitem(sys.modules, "xformers.ops", xf.ops)
    monkeypatch.setattr(ap, "xformers", xf)
    monkeypatch.setattr(ap, "is_xformers_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    randn = torch.randn      # diffusers' test call asks for device="cuda": on the CPU here
    monkeypatch.setattr(torch, "randn", lambda *a, device=None, **k: randn(*a, device=None if device == "cuda"
                                                                          else device, **k))
    m = b.measure(_case("xf", attention="xformers", dtype="bf16"), synthetic_image(64, 48, "xf"))
    assert m["status"] == "ok", m["error"]
    assert m["xformers_version"] == "0.0.35"
    assert set(calls) - {(1, 2, 40)}                        # more than diffusers' test calls
    assert {e["stage"] for e in m["sdpa"]} == {"text_encoder", "safety_checker"}   # CLIP keeps SDPA
    assert {k: type(p) for k, p in b.pipe.unet.attn_processors.items()} == before


def test_cuda_backend_runs_txt2img_and_inpaint(fake_gpu):
    """txt2img and inpaint (issue 13) run from_pipe pipelines of the loaded one (its modules,
    its dtype); the inpainting UNet's 9-channel conv_in replaces the 4-channel one for its case
    only (on a GPU the 4-channel one waits on the CPU meanwhile)."""
    from sd_vram.plugin import gpu

    b = gpu.CudaBackend(monitor=gpu.NvmlMonitor(), device="cpu", warmup=False, dtype=torch.float32)
    conv_in = b.pipe.unet.conv_in
    m = b.measure(_case("t2i", pipeline="txt2img", strength=None), None)
    assert m["status"] == "ok", m["error"]
    assert m["stage_order"] == ["setup", "text_encoder", "unet", "vae_decode", "safety_checker"]
    assert m["unet_evals"] == 3
    assert all(p.dtype == torch.float32 for p in b.pipe.unet.parameters())   # from_pipe kept the dtype
    seen = []
    hook = b.pipe.unet.register_forward_pre_hook(lambda mod, args: seen.append((mod.conv_in.in_channels,
                                                                               mod.conv_in is conv_in)))
    for unet, channels in (("standard", 4), ("inpainting", 9)):
        seen.clear()
        case = _case(f"inpaint-{unet}", pipeline="inpaint", inpaint_unet=unet, mask_size=[48, 64],
                     pipe_height=48, pipe_width=64)
        m = b.measure(case, synthetic_image(64, 48, case.name))
        assert m["status"] == "ok", m["error"]
        assert m["stage_order"] == ["setup", "text_encoder", "vae_encode", "unet", "vae_decode", "safety_checker"]
        assert {c for c, _ in seen} == {channels}
        assert {own for _, own in seen} == {channels == 4}
    hook.remove()
    assert b.pipe.unet.conv_in is conv_in and b.pipe.unet.config.in_channels == 4   # restored
    b.close()


def test_cuda_backend_rebuilds_for_channels_last(fake_gpu):
    """A channels_last case (issue 11 item 3) rebuilds the pipeline with the UNet's and VAE's
    4-D weights in channels-last (the safety checker's patch conv untouched), then a case
    without it rebuilds NCHW again; the inpainting conv_in follows the UNet's format."""
    from sd_vram.plugin import gpu

    from sd_vram.models import is_channels_last

    def formats(pipe):
        """(UNet and VAE 4-D weights all channels-last, the safety checker's patch conv's)."""
        four = [p for m in (pipe.unet, pipe.vae) for p in m.parameters() if p.dim() == 4]
        patch = pipe.safety_checker.vision_model.embeddings.patch_embedding.weight
        return all(is_channels_last(p) for p in four), is_channels_last(patch)

    b = gpu.CudaBackend(monitor=gpu.NvmlMonitor(), device="cpu", warmup=False, dtype=torch.float32)
    assert not any(is_channels_last(p) for m in (b.pipe.unet, b.pipe.vae) for p in m.parameters())
    m = b.measure(_case("cl", channels_last=True), synthetic_image(64, 48, "cl"))
    assert m["status"] == "ok", m["error"]
    assert b.channels_last and formats(b.pipe) == (True, False)   # 1x1 filters too; CLIP untouched
    seen = []
    hook = b.pipe.unet.register_forward_pre_hook(
        lambda mod, args: seen.append(mod.conv_in.weight.is_contiguous(memory_format=torch.channels_last)))
    case = _case("cl-inpaint", channels_last=True, pipeline="inpaint", inpaint_unet="inpainting",
                 mask_size=[48, 64], pipe_height=48, pipe_width=64)
    assert b.measure(case, synthetic_image(64, 48, case.name))["status"] == "ok"
    assert seen and all(seen)
    hook.remove()
    assert b.measure(_case("nchw"), synthetic_image(64, 48, "nchw"))["status"] == "ok"
    assert not b.channels_last and formats(b.pipe) == (False, False)
    b.close()
