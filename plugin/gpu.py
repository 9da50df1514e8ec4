"""Real-GPU measurement (imported only with `pytest --gpu`, or by the device tasks).

Per process: NVML baseline of every device before the first CUDA call (NvmlMonitor), then
CUDA init and the hardware constants (context, cuBLAS workspace, cuDNN handles), the
pipeline built with random weights drawn on the GPU (or the user's model) in the first case's
dtype, and a warm-up under each attention backend so lazily loaded kernels are resident before
the first measured call. Each case then runs the real call with per-stage peaks from the
caching allocator and NVML sampled by a background thread; a case of another dtype
(Options.dtype) or memory format (Options.channels_last) first rebuilds the pipeline (use_build).
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time

from sd_vram.formula.allocator import block_bytes

from .archive import gpu_slug
from .cases import Case
from .environment import env_vars, versions

BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
            "math": "MATH"}


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _short(e: BaseException, limit: int = 1500) -> str:
    s = str(e).strip()
    return s if len(s) <= limit else s[:limit] + " ..."


def _norm_uuid(u) -> str:
    u = _text(u).strip().lower()
    return u[4:] if u.startswith("gpu-") else u


class NvmlMonitor:
    """NVML readings of this process's GPU; the baseline is taken at construction, before CUDA."""

    def __init__(self):
        import pynvml

        self.nv = pynvml
        pynvml.nvmlInit()
        self.handles = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            self.handles[_norm_uuid(pynvml.nvmlDeviceGetUUID(h))] = h
        self.v2_supported = True
        self.baselines = {u: self._read(h) for u, h in self.handles.items()}
        self.handle = None
        self.uuid = None
        self.base = {"v1": None, "v2": None}

    def _read(self, h) -> dict:
        nv = self.nv
        v1 = nv.nvmlDeviceGetMemoryInfo(h)
        v2 = None
        if self.v2_supported and hasattr(nv, "nvmlMemory_v2"):
            try:
                v2 = nv.nvmlDeviceGetMemoryInfo(h, version=nv.nvmlMemory_v2).used
            except Exception:        # old driver: v2 unsupported; stop asking
                self.v2_supported = False
        return {"v1": v1.used, "v2": v2, "total": v1.total}

    def bind(self, torch_uuid) -> bool:
        """Select the device torch uses, by UUID (indices differ under CUDA_VISIBLE_DEVICES)."""
        u = _norm_uuid(torch_uuid)
        if u in self.handles:
            self.uuid, self.handle, self.base = u, self.handles[u], self.baselines[u]
            return True
        return False

    def used(self) -> tuple[int | None, int | None]:
        if self.handle is None:
            return None, None
        r = self._read(self.handle)
        return r["v1"], r["v2"]

    def process_used(self) -> int | None:
        """This process's usedGpuMemory (None inside containers where PIDs do not match)."""
        if self.handle is None:
            return None
        try:
            procs = self.nv.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except Exception:
            return None
        pid = os.getpid()
        for p in procs:
            if p.pid == pid:
                return p.usedGpuMemory
        return None

    def driver(self) -> dict:
        out = {}
        for key, fn in (("driver", "nvmlSystemGetDriverVersion"), ("cuda_driver", "nvmlSystemGetCudaDriverVersion_v2"),
                        ("nvml", "nvmlSystemGetNVMLVersion")):
            try:
                out[key] = _text(getattr(self.nv, fn)())
            except Exception:
                out[key] = None
        return out


class Sampler:
    """Background thread reading NVML every `interval` seconds; keeps the maxima."""

    def __init__(self, monitor: NvmlMonitor, interval: float = 0.002):
        self.monitor, self.interval = monitor, interval
        self.max_v1 = self.max_v2 = self.max_proc = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sd-vram-nvml", daemon=True)

    def _take(self, proc: bool):
        v1, v2 = self.monitor.used()
        if v1 is not None:
            self.max_v1 = v1 if self.max_v1 is None else max(self.max_v1, v1)
        if v2 is not None:
            self.max_v2 = v2 if self.max_v2 is None else max(self.max_v2, v2)
        if proc:
            p = self.monitor.process_used()
            if p is not None:
                self.max_proc = p if self.max_proc is None else max(self.max_proc, p)
        self.samples += 1

    def _run(self):
        while not self._stop.is_set():
            self._take(proc=self.samples % 25 == 0)    # the process list is slower to read
            self._stop.wait(self.interval)

    def __enter__(self):
        self._take(proc=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._take(proc=True)        # the caching allocator never shrinks during a call: the end is a maximum
        return False


@contextlib.contextmanager
def sdpa_recorder(stage: dict):
    """Wrap F.scaled_dot_product_attention: ask PyTorch which backend it picks for each new shape."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend

    orig = F.scaled_dot_product_attention
    seen: dict = {}

    def wrapper(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **kw):
        k = (stage.get("name"), tuple(query.shape), tuple(key.shape), str(query.dtype),
             None if attn_mask is None else tuple(attn_mask.shape), bool(is_causal))
        entry = seen.get(k)
        if entry is None:
            try:
                choice = torch._fused_sdp_choice(query, key, value, attn_mask, dropout_p, is_causal,
                                                 scale=scale, enable_gqa=enable_gqa)
                backend = SDPBackend(int(choice)).name
            except Exception as e:
                backend = f"unknown ({type(e).__name__})"
            entry = seen[k] = {"stage": k[0], "query": list(k[1]), "key": list(k[2]), "dtype": k[3],
                               "mask": None if k[4] is None else list(k[4]), "is_causal": k[5],
                               "backend": backend, "calls": 0}
        entry["calls"] += 1
        if enable_gqa:
            kw["enable_gqa"] = enable_gqa
        return orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                    scale=scale, **kw)

    F.scaled_dot_product_attention = wrapper
    try:
        yield seen
    finally:
        F.scaled_dot_product_attention = orig


class XformersUnavailable(RuntimeError):
    """attention="xformers" on a machine where xformers does not import: the case is skipped."""


def xformers_version() -> str:
    """The installed xformers' version, or XformersUnavailable saying why it cannot be used."""
    try:
        import xformers
        import xformers.ops  # noqa: F401  (what diffusers imports)
    except Exception as e:  # ImportError, or a broken build raising at import
        raise XformersUnavailable(f"xformers does not import here ({type(e).__name__}: {_short(e, 300)}); "
                                  "pip install xformers==0.0.35 (3.3 MB wheel, torch >= 2.10) to measure "
                                  "attention=xformers") from None
    return getattr(xformers, "__version__", "unknown")


def attention_context(name: str):
    """The SDPA backend a case asks for, as formula/kernels.py defines it: that backend first,
    PyTorch's order after it, every backend enabled (sdpa_kernel([FLASH_ATTENTION]) alone
    would raise "No available kernel" for the VAE's head dim 512); "math" alone; "auto"
    leaves PyTorch's choice untouched."""
    if name in ("auto", "xformers"):   # xformers: CLIP's SDPA keeps PyTorch's choice
        return contextlib.nullcontext()
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = getattr(SDPBackend, BACKENDS[name])
    if name == "math":
        return sdpa_kernel([first])
    known = {int(getattr(SDPBackend, b)) for b in BACKENDS.values()}
    rest = [SDPBackend(int(b)) for b in torch._C._get_sdp_priority_order() if int(b) in known and int(b) != int(first)]
    return sdpa_kernel([first, *rest], set_priority=True)


@contextlib.contextmanager
def cudnn_flags(opts):
    """torch.backends.cudnn.enabled / benchmark / deterministic as a case asks (Options.cudnn,
    cudnn_benchmark, cudnn_deterministic), restored afterwards. cuDNN's benchmark cache lives as
    long as the process: a shape searched by an earlier case is not searched again."""
    import torch

    cudnn = torch.backends.cudnn
    before = (cudnn.enabled, cudnn.benchmark, cudnn.deterministic)
    cudnn.enabled, cudnn.benchmark, cudnn.deterministic = (
        bool(getattr(opts, "cudnn", True)), bool(getattr(opts, "cudnn_benchmark", False)),
        bool(getattr(opts, "cudnn_deterministic", False)))
    try:
        yield
    finally:
        cudnn.enabled, cudnn.benchmark, cudnn.deterministic = before


def preflight():
    """NVML baseline before any CUDA call, then check CUDA; raises RuntimeError with the reason."""
    try:
        monitor = NvmlMonitor()
    except Exception as e:
        raise RuntimeError(f"NVML could not start ({type(e).__name__}: {e}), so no NVIDIA driver is usable here") from None
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA device")
    return monitor


class CudaBackend:
    name = "cuda"
    wants_image = True

    def __init__(self, monitor: NvmlMonitor | None = None, model: str | None = None, device: str = "cuda",
                 warmup: bool = True, dtype=None):
        import torch

        self.torch = torch
        self.device = device
        self.monitor = monitor or NvmlMonitor()
        self.model = model
        self.dtype = dtype or torch.float16     # the first build's; a case of another dtype rebuilds (use_build)
        self.channels_last = False              # the UNet's and VAE's weights' memory format (use_build)
        self.hardware: dict = {}
        self.warmup: list[dict] = []
        self.xformers: str | None = None        # its version, once an xformers case enabled it
        t0 = time.perf_counter()
        self._init_cuda()
        self._build(model)
        if warmup:
            self._warmup()
        # Everything alive now (modules, the pipeline) stays: freezing it makes the gc.collect()
        # before and after each case cheap (a full collection walks every object otherwise).
        gc.collect()
        gc.freeze()
        self.hardware["setup_s"] = round(time.perf_counter() - t0, 2)

    # --- per process --------------------------------------------------------------------------
    def _init_cuda(self):
        torch, hw, mon = self.torch, self.hardware, self.monitor
        cuda = torch.cuda
        cuda.init()
        x = torch.zeros(1, device=self.device)
        cuda.synchronize()
        props = cuda.get_device_properties(torch.device(self.device))
        uuid = str(getattr(props, "uuid", ""))
        bound = mon.bind(uuid)
        self.gpu = {"name": props.name, "slug": gpu_slug(props.name), "uuid": "GPU-" + _norm_uuid(uuid),
                    "nvml_matched": bound, "total_memory_bytes": props.total_memory,
                    "compute_capability": f"{props.major}.{props.minor}",
                    "multi_processor_count": props.multi_processor_count}
        hw["nvml_baseline_used_v1_bytes"] = mon.base["v1"]
        hw["nvml_baseline_used_v2_bytes"] = mon.base["v2"]
        hw["cuda_context_bytes"] = self._nvml_over_reserved()
        # cuBLAS: its workspace comes from the caching allocator at the first matmul and stays.
        a = torch.randn(256, 256, dtype=torch.float16, device=self.device)
        cuda.synchronize()
        al0, re0 = cuda.memory_allocated(), cuda.memory_reserved()
        b = a @ a
        cuda.synchronize()
        hw["cublas_workspace_allocated_bytes"] = cuda.memory_allocated() - al0 - block_bytes(b.nbytes)
        hw["cublas_workspace_reserved_bytes"] = cuda.memory_reserved() - re0
        # cuBLASLt (linear with bias) may keep its own workspace.
        w = torch.randn(256, 256, dtype=torch.float16, device=self.device)
        bias = torch.randn(256, dtype=torch.float16, device=self.device)
        cuda.synchronize()
        al1 = cuda.memory_allocated()
        y = torch.nn.functional.linear(a, w, bias)
        cuda.synchronize()
        hw["cublaslt_extra_allocated_bytes"] = cuda.memory_allocated() - al1 - block_bytes(y.nbytes)
        # cuDNN: handle creation and module loading show up in NVML, not in the allocator.
        xi = torch.randn(1, 8, 32, 32, dtype=torch.float16, device=self.device)
        kw = torch.randn(8, 8, 3, 3, dtype=torch.float16, device=self.device)
        cuda.synchronize()
        al2 = cuda.memory_allocated()
        z = torch.nn.functional.conv2d(xi, kw, padding=1)
        cuda.synchronize()
        hw["cudnn_conv_kept_allocated_bytes"] = cuda.memory_allocated() - al2 - block_bytes(z.nbytes)
        hw["context_and_handles_bytes"] = self._nvml_over_reserved()
        del x, a, b, w, bias, y, xi, kw, z
        gc.collect()
        cuda.empty_cache()
        hw["allocated_after_probes_bytes"] = cuda.memory_allocated()
        hw["reserved_after_probes_bytes"] = cuda.memory_reserved()
        self.environment = {
            "backend": "cuda", **versions(), **mon.driver(),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "allocator_backend": _try(cuda.get_allocator_backend),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_deterministic": torch.backends.cudnn.deterministic, "cudnn_enabled": torch.backends.cudnn.enabled,
            "sdp": {name: _try(lambda n=name: getattr(torch.backends.cuda, n)()) for name in (
                "flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled", "cudnn_sdp_enabled",
                "fp16_bf16_reduction_math_sdp_allowed")},
            "nvml_memory_v2": mon.base["v2"] is not None,
            "env": env_vars(), "gpu": dict(self.gpu),
            "model": self.model or f"bundled SD1.5 config, random {self.dtype_name} weights",
        }

    def _nvml_over_reserved(self) -> int | None:
        """NVML used minus the pre-CUDA baseline minus torch's reserved memory: context and handles."""
        self.torch.cuda.synchronize()
        v1, _ = self.monitor.used()
        if v1 is None or self.monitor.base["v1"] is None:
            return None
        return v1 - self.monitor.base["v1"] - self.torch.cuda.memory_reserved()

    def _build(self, model):
        from sd_vram.models import build_pipeline, load_pipeline

        cuda = self.torch.cuda
        if model:
            self.pipe = load_pipeline(model, device=self.device, dtype=self.dtype, channels_last=self.channels_last)
        else:
            self.pipe = build_pipeline(self.device, dtype=self.dtype, channels_last=self.channels_last)
        self.pipe.set_progress_bar_config(disable=True)
        self._checker = self.pipe.safety_checker
        self._schedulers = {"pndm": self.pipe.scheduler}   # by option name, each built once
        self._derived = {}                                 # txt2img / inpaint from_pipe of it (_pipeline)
        self._unet_procs = dict(self.pipe.unet.attn_processors)
        self._vae_procs = dict(self.pipe.vae.attn_processors) if hasattr(self.pipe.vae, "attn_processors") else None
        gc.collect()
        cuda.synchronize()
        cuda.empty_cache()
        weights = cuda.memory_allocated() - self.hardware["allocated_after_probes_bytes"]
        if "weights_allocated_bytes" not in self.hardware:     # the first build's, as before dtypes
            self.hardware["weights_allocated_bytes"] = weights
            self.hardware["resident_allocated_bytes"] = cuda.memory_allocated()
        self.hardware.setdefault("weights_allocated_bytes_by_dtype", {})[self.dtype_name] = weights

    @property
    def dtype_name(self) -> str:
        """The pipeline's dtype as Options.dtype names it (fp16, bf16, fp32)."""
        from sd_vram.formula.options import DTYPE_TORCH_NAME

        torch_name = str(self.dtype).removeprefix("torch.")
        return next(k for k, v in DTYPE_TORCH_NAME.items() if v == torch_name)

    def use_build(self, name: str, channels_last: bool = False) -> None:
        """Rebuild the pipeline in dtype `name` (Options.dtype) and memory format (Options.channels_last:
        the UNet and VAE converted before their weights reach the GPU) unless it is built so: the old
        pipeline's weights are freed and their segments released first, so the new weights pack
        from the probes' state as the first build's did (simulation/resident.py replays that),
        then the warm-up loads that build's kernels."""
        from sd_vram.models import torch_dtype

        dtype = torch_dtype(name)
        if dtype == self.dtype and channels_last == self.channels_last:
            return
        self.pipe = self._checker = None
        self._unet_procs = self._vae_procs = None
        gc.unfreeze()
        gc.collect()
        self.torch.cuda.empty_cache()
        self.dtype, self.channels_last = dtype, channels_last
        self._build(self.model)
        self._warmup(keep=True)
        gc.collect()
        gc.freeze()

    def _warmup(self, keep: bool = False):
        """Tiny calls under each backend: kernels load lazily (CUDA_MODULE_LOADING=LAZY) on first use.
        In the pipeline's dtype and memory format; keep: add to the earlier warm-ups (a rebuild, use_build)."""
        base = {"guidance_scale": 5.0, "num_images_per_prompt": 1, "strength": 1.0, "num_inference_steps": 2,
                "attention_slicing": None, "vae_slicing": False, "vae_tiling": False, "safety_checker": True,
                "output_type": "pil", "dtype": self.dtype_name, "channels_last": self.channels_last}
        if not keep:
            self.warmup = []
        try:
            xformers_version()
            # the kernels its ops pick load on first use too (xformers is modelled for 2-byte dtypes)
            xformers = ("xformers",) if self.dtype_name != "fp32" else ()
        except XformersUnavailable:
            xformers = ()
        for attention in ("auto", "efficient", "math") + xformers:
            suffix = "" if self.dtype_name == "fp16" else f"-{self.dtype_name}"
            suffix += "-channels-last" if self.channels_last else ""
            case = Case(name=f"warmup-{attention}-64x64{suffix}", width=64, height=64, prompt="warm-up",
                        options={**base, "attention": attention})
            from .cases import synthetic_image

            m = self.measure(case, synthetic_image(64, 64, case.name))
            self.warmup.append({"case": case.name, "status": m["status"], "error": m["error"],
                                "wall_s": m["wall_s"]})
        self.hardware["context_after_warmup_bytes"] = self._nvml_over_reserved()

    # --- per case -----------------------------------------------------------------------------
    def capacity(self) -> int:
        """Bytes the caching allocator could hold now: free device memory plus what it already reserves."""
        cuda = self.torch.cuda
        cuda.empty_cache()
        free, _total = cuda.mem_get_info()
        return free + cuda.memory_reserved()

    def limit(self, capacity: int | None) -> None:
        """At most `capacity` bytes for the caching allocator (None: the whole card), as
        set_per_process_memory_fraction sets allowed_memory_maximum = fraction x total."""
        cuda = self.torch.cuda
        cuda.empty_cache()
        total = cuda.get_device_properties(self.device).total_memory
        cuda.set_per_process_memory_fraction(1.0 if capacity is None else min(capacity / total, 1.0), self.device)

    def _configure(self, opts):
        pipe = self.pipe
        _check_process_allocator(opts)
        if opts.safety_checker:
            if pipe.safety_checker is None:
                if self._checker is None:
                    raise RuntimeError("this model has no safety checker")
                self._checker.to(self.device)
                pipe.safety_checker = self._checker
        elif pipe.safety_checker is not None:
            pipe.safety_checker = None
            self._checker.to("cpu")            # off the GPU, as if built without one
        pipe.vae.enable_tiling() if opts.vae_tiling else pipe.vae.disable_tiling()
        pipe.vae.enable_slicing() if opts.vae_slicing else pipe.vae.disable_slicing()
        self._restore_processors()
        if opts.attention == "xformers":
            # before slicing: the later of the two sets the UNet's processors, as in the simulation
            self.xformers = xformers_version()
            pipe.enable_xformers_memory_efficient_attention()
        if opts.attention_slicing is not None:
            pipe.enable_attention_slicing(opts.attention_slicing)
        pipe.scheduler = self._scheduler(opts.scheduler)

    def _scheduler(self, name: str):
        """The case's scheduler as users switch it: X.from_config(pipe.scheduler.config) of the
        pipeline's own (PNDM) scheduler; built once per name, so, like PNDM's, it keeps what it
        moved to the device (alphas_cumprod) from one case to the next."""
        if name not in self._schedulers:
            import importlib.util

            from sd_vram.models import switch_scheduler

            if name == "lms" and importlib.util.find_spec("scipy") is None:
                raise RuntimeError("the lms scheduler needs scipy (get_lms_coefficient uses scipy.integrate)")
            self._schedulers[name] = switch_scheduler(self._schedulers["pndm"], name)
        return self._schedulers[name]

    def _restore_processors(self):
        """The processors the pipeline was built with (AttnProcessor2_0): undoes attention
        slicing and xformers."""
        self.pipe.unet.set_attn_processor(dict(self._unet_procs))
        if self._vae_procs:
            self.pipe.vae.set_attn_processor(dict(self._vae_procs))

    def _pipeline(self, opts):
        """The case's pipeline: the img2img one, or StableDiffusionPipeline /
        StableDiffusionInpaintPipeline made from it by from_pipe, which shares its modules (no
        second copy of the weights). from_pipe casts every module to its dtype argument
        (float32 when not given), the shared ones too: it is given the pipeline's."""
        if opts.pipeline == "img2img":
            return self.pipe
        derived = self._derived
        if opts.pipeline not in derived:
            import diffusers

            cls = {"txt2img": diffusers.StableDiffusionPipeline, "inpaint": diffusers.StableDiffusionInpaintPipeline}
            derived[opts.pipeline] = cls[opts.pipeline].from_pipe(self.pipe, dtype=self.dtype)
            derived[opts.pipeline].set_progress_bar_config(disable=True)
        pipe = derived[opts.pipeline]
        # what _configure set on the img2img pipeline's attributes (its modules are shared)
        pipe.scheduler, pipe.safety_checker = self.pipe.scheduler, self.pipe.safety_checker
        return pipe

    def _unet_for(self, opts):
        """The inpainting checkpoint's UNet (9 input channels) in place of SD1.5's for the call:
        with the bundled random weights, its conv_in swapped in (sd_vram.models.unet_in_channels);
        a user's model must already have the UNet the case asks for."""
        from sd_vram.models import unet_in_channels

        unet = self.pipe.unet
        if self.model and unet.config.in_channels != opts.unet_in_channels:
            raise RuntimeError(f"the model's UNet has {unet.config.in_channels} input channels; the case needs "
                               f"{opts.unet_in_channels} (inpaint_unet {opts.inpaint_unet})")
        return unet_in_channels(unet, opts.unet_in_channels)

    @staticmethod
    def _inputs(opts, image) -> dict:
        """pipe(...)'s image arguments: img2img the image, inpaint the image and a mask of its size
        (plugin/cases.py synthetic_mask), txt2img none."""
        if opts.pipeline == "txt2img":
            return {}
        if opts.pipeline == "inpaint":
            from .cases import synthetic_mask

            return {"image": image, "mask_image": synthetic_mask(*image.size)}
        return {"image": image}

    # --- LoRA (--lora): a synthetic adapter of the case's rank and targets -----------------------
    def cannot_run(self, case) -> str | None:
        """Why this backend cannot run `case` (the session skips it), or None."""
        return lora_unavailable(case.opts)

    def _configure_lora(self, opts):
        """pipe.load_lora_weights of random fp16 CPU tensors shaped as opts.adapters (a file's
        header or RANK[:TARGETS]: formula/lora.py; nothing is downloaded), then fuse_lora
        with lora_fused, as a user loads a LoRA file onto the pipeline on the GPU. measure()
        unloads it after the call."""
        if opts.adapters is None:
            return
        torch = self.torch
        gen = torch.Generator().manual_seed(0)
        state_dict = {key: (torch.randn(shape, generator=gen) * 0.01).to(torch.float16)
                      for key, shape in opts.adapters.state_dict_shapes().items()}
        self.pipe.load_lora_weights(state_dict)
        self._lora_fused = bool(opts.lora_fused)
        if opts.lora_fused:
            self.pipe.fuse_lora()
        del state_dict

    def _unload_lora(self):
        if getattr(self, "_lora_fused", None) is None:
            return
        if self._lora_fused:
            self.pipe.unfuse_lora()       # the base weights as they were
        self.pipe.unload_lora_weights()
        self._lora_fused = None

    def _reset_scheduler(self):
        # A scheduler keeps its last model outputs after a call (PNDM's ets and cur_sample,
        # DPM-Solver's and UniPC's model_outputs, UniPC's last_sample, LMS's derivatives);
        # a fresh call starts without them.
        s = self.pipe.scheduler
        for name, empty in (("ets", list), ("derivatives", list), ("cur_sample", None), ("last_sample", None),
                            ("counter", 0)):
            if hasattr(s, name):
                setattr(s, name, empty() if callable(empty) else empty)
        if hasattr(s, "model_outputs"):
            s.model_outputs = [None] * len(s.model_outputs)

    def measure(self, case: Case, image, around_call=None, size=None) -> dict:
        """One case's call: a Measurement (plugin/backends.py, the archive's "measurement"),
        in the case's pipeline (txt2img and inpaint: from_pipe of the loaded one)."""
        m: dict = {"status": "ok", "error": None}
        unet_swap = contextlib.ExitStack()
        try:
            self.use_build(case.opts.dtype, case.opts.channels_last)
            self._configure(case.opts)
            self._configure_lora(case.opts)
            pipe = self._pipeline(case.opts)
            unet_swap.enter_context(self._unet_for(case.opts))
        except XformersUnavailable as e:
            unet_swap.close()
            self._restore_processors()
            m.update(status="skipped", error=str(e))
            return m
        except Exception as e:
            unet_swap.close()
            self._unload_lora()
            m.update(status="error", error=f"setup: {type(e).__name__}: {_short(e)}")
            return m
        with unet_swap:
            return self._measure(case, image, pipe, m, around_call)

    def _measure(self, case: Case, image, pipe, m: dict, around_call) -> dict:
        torch = self.torch
        cuda = torch.cuda
        from sd_vram.stages import stage_hooks
        self._reset_scheduler()
        gc.collect()
        cuda.synchronize()
        cuda.empty_cache()
        cuda.reset_peak_memory_stats()
        stats0 = cuda.memory_stats()
        m["resident_allocated_bytes"] = cuda.memory_allocated()
        m["resident_reserved_bytes"] = cuda.memory_reserved()
        free, _ = cuda.mem_get_info()
        m["capacity_bytes"] = free + m["resident_reserved_bytes"]
        m["context_bytes_before"] = self._nvml_over_reserved()

        stages: dict = {}
        order: list = []
        current = {"name": None}

        seconds: dict = {}
        entered = [0.0]

        def close_stage():
            name = current["name"]
            if name is not None:
                s = stages.setdefault(name, {"allocated_bytes": 0, "reserved_bytes": 0})
                s["allocated_bytes"] = max(s["allocated_bytes"], cuda.max_memory_allocated())
                s["reserved_bytes"] = max(s["reserved_bytes"], cuda.max_memory_reserved())
                # Stage times (to foresee a full call's length from the UNet's): synchronize so a
                # stage's time is its kernels', not its launches'. Allocations are made at launch,
                # on the host, so this changes no memory figure.
                cuda.synchronize()
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - entered[0]

        def on_stage(name):
            close_stage()
            current["name"] = name
            if name not in order:
                order.append(name)
            cuda.reset_peak_memory_stats()
            entered[0] = time.perf_counter()

        evals = [0]
        counter = self.pipe.unet.register_forward_hook(lambda *_a: evals.__setitem__(0, evals[0] + 1))
        out = None
        t0 = time.perf_counter()
        try:
            with Sampler(self.monitor) as sampler, sdpa_recorder(current) as sdpa, \
                    attention_context(case.opts.attention), cudnn_flags(case.opts), \
                    stage_hooks(self.pipe, on_stage):
                with around_call() if around_call else contextlib.nullcontext():
                    try:
                        out = pipe(case.prompt, **self._inputs(case.opts, image), **case.call_kwargs())
                        cuda.synchronize()
                    except torch.OutOfMemoryError as e:
                        m.update(status="oom", error=_short(e))
                    except Exception as e:
                        m.update(status="error", error=f"{type(e).__name__}: {_short(e)}")
                    finally:
                        close_stage()
        finally:
            counter.remove()
            if case.opts.attention == "xformers":
                self._restore_processors()
                m["xformers_version"] = self.xformers
        m["wall_s"] = round(time.perf_counter() - t0, 3)
        del out
        self._reset_scheduler()
        gc.collect()
        cuda.synchronize()
        cuda.empty_cache()
        stats1 = cuda.memory_stats()

        m["stages"] = stages
        m["stage_order"] = order
        m["stage_seconds"] = {k: round(v, 3) for k, v in seconds.items()}
        if stages:
            peak = max(order, key=lambda s: stages[s]["allocated_bytes"])   # first stage wins a tie
            m["peak_stage"] = peak
            m["peak_allocated_bytes"] = stages[peak]["allocated_bytes"]
            m["peak_reserved_bytes"] = max(s["reserved_bytes"] for s in stages.values())
        else:
            m.update(peak_stage=None, peak_allocated_bytes=None, peak_reserved_bytes=None)
        b1, b2 = self.monitor.base["v1"], self.monitor.base["v2"]
        m["peak_device_v1_bytes"] = None if sampler.max_v1 is None or b1 is None else sampler.max_v1 - b1
        m["peak_device_v2_bytes"] = None if sampler.max_v2 is None or b2 is None else sampler.max_v2 - b2
        m["peak_device_bytes"] = m["peak_device_v2_bytes"] if m["peak_device_v2_bytes"] is not None else m["peak_device_v1_bytes"]
        m["peak_process_bytes"] = sampler.max_proc
        m["nvml_samples"] = sampler.samples
        m["sdpa"] = list(sdpa.values())
        m["unet_evals"] = evals[0]
        for key in ("num_alloc_retries", "num_ooms", "num_device_alloc", "num_device_free"):
            if key in stats1:
                m[key] = stats1[key] - stats0.get(key, 0)
        m["allocated_after_bytes"] = cuda.memory_allocated()
        self._unload_lora()
        gc.collect()
        cuda.empty_cache()
        return m

    def close(self):
        self.pipe = None
        gc.unfreeze()
        gc.collect()
        self.torch.cuda.empty_cache()


def _check_process_allocator(opts) -> None:
    """A case's alloc_conf is the process's: the allocator reads its settings once, at CUDA
    start, so a case asking for other settings than the run's is refused, not mismeasured."""
    from sd_vram.formula import allocconf

    from .checks import alloc_conf
    from .environment import env_vars

    if not opts.alloc_conf_text:
        return
    process = alloc_conf(env_vars())
    if allocconf.parse(process) != opts.allocator:
        raise RuntimeError(f"this case needs PYTORCH_CUDA_ALLOC_CONF={opts.alloc_conf_text}; the run has {process or 'none'}: "
                           "start pytest with it set")


def lora_unavailable(opts) -> str | None:
    """A LoRA case needs peft (diffusers' load_lora_weights: require_peft_backend)."""
    if opts.adapters is None:
        return None
    try:
        import peft  # noqa: F401
    except ImportError as e:
        return f"--lora needs peft, which does not import here ({e}); install sd-vram[sim]"
    return None


def _try(fn):
    try:
        return fn()
    except Exception:
        return None
