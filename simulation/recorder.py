"""Record every tensor storage allocation and free on one device type.

`MemoryRecorder` is a TorchDispatchMode. Pushed above a FakeTensorMode (or alone, over real
tensors) it sees each aten operator after autograd and CompositeImplicit decomposition,
the level at which eager PyTorch calls the allocator: every output whose storage it has not
seen is an allocation of ``storage.nbytes()`` bytes; a ``weakref.finalize`` on the storage
records the free when CPython's refcounting drops the last reference, exactly when the
real code would return the block to the caching allocator. Python storage objects are
preserved as long as their StorageImpl lives, so the finalizer does not fire early.

Each event carries the stage (sd_vram.stages), the module path (global forward pre/post
hooks keep a stack) and the aten operator running at that moment.

Small tensors (at most SHADOW_NUMEL elements) whose inputs are all known also get a
"shadow": the real value computed on the CPU. ``.item()``/``bool()`` on such a fake tensor
(e.g. the PNDM scheduler's ``prev_timestep >= 0``) then returns the value the real run
computes, so the fake run takes the same Python branches.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

SHADOW_NUMEL = 4096

_aten = torch.ops.aten
_SCALAR_OPS = {_aten._local_scalar_dense.default}
# Ops whose value we must not invent (random or uninitialised memory).
_NO_SHADOW_TAGS = (torch.Tag.nondeterministic_seeded,)
_NO_SHADOW_OPS = {_aten.empty.memory_format, _aten.empty_strided.default, _aten.empty_like.default,
                  _aten.new_empty.default, _aten.new_empty_strided.default}


@dataclass(slots=True)
class Event:
    kind: str            # "alloc" | "free" | "empty_cache" (torch.cuda.empty_cache(), key 0)
    key: int             # identifies the storage (and the block) across alloc/free
    nbytes: int          # bytes requested from the allocator (storage nbytes)
    op: str              # aten operator running (or "weights", or a synthetic name)
    module: str          # innermost module path
    stage: str
    shape: tuple = ()
    dtype: str = ""
    block: int = 0       # size of the allocator block it got (set by the replay)

    def __iter__(self):  # allocator.replay reads (kind, key, nbytes)
        return iter((self.kind, self.key, self.nbytes))

    def __getitem__(self, i):
        return (self.kind, self.key, self.nbytes)[i]


def _short(func) -> str:
    name = str(func)
    return name[len("aten."):] if name.startswith("aten.") else name


class MemoryRecorder(TorchDispatchMode):
    """Records allocations/frees of storages on `device_type` ("cuda" or "cpu")."""

    def __init__(self, device_type: str = "cuda", shadows: bool = True):
        super().__init__()
        self.device_type = device_type
        self.device_types = {device_type}
        self.events: list[Event] = []
        self.live: dict[int, Event] = {}
        self.stage = "setup"
        self.op = ""
        self.module_stack: list[str] = []
        self.module_names: dict[int, str] = {}
        self._hook_handles = []
        self.shadows_enabled = shadows
        self._shadow: dict[int, torch.Tensor] = {}
        self.post_op_hooks = []          # callables(func, args, kwargs, out) -> None
        # func -> callable(func, args, kwargs) -> out: runs instead of func (the kernel's own
        # internal allocations made visible, see kernel_hooks._layer_norm_contiguous)
        self.rewrites = {}
        self._synthetic = 0
        self.op_counts: dict[str, int] = {}

    # -- context ------------------------------------------------------------------------
    @property
    def module(self) -> str:
        return self.module_stack[-1] if self.module_stack else ""

    def set_stage(self, name: str) -> None:
        self.stage = name

    def name_modules(self, named_roots: dict) -> None:
        for root_name, root in named_roots.items():
            if isinstance(root, torch.nn.Module):
                for name, m in root.named_modules():
                    self.module_names[id(m)] = f"{root_name}.{name}" if name else root_name

    def install_module_hooks(self) -> None:
        names = self.module_names

        def pre(mod, args):
            self.module_stack.append(names.get(id(mod), type(mod).__name__))

        def post(mod, args, out):
            if self.module_stack:
                self.module_stack.pop()

        from torch.nn.modules import module as _m

        self._hook_handles = [_m.register_module_forward_pre_hook(pre),
                              _m.register_module_forward_hook(post, always_call=True)]

    def remove_module_hooks(self) -> None:
        for h in self._hook_handles:
            h.remove()
        self._hook_handles = []

    def __enter__(self):
        self.install_module_hooks()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self.remove_module_hooks()

    # -- recording ----------------------------------------------------------------------
    def track(self, t: torch.Tensor, op: str | None = None, module: str | None = None) -> bool:
        """Record t's storage as allocated now (if on the tracked device and new)."""
        if not isinstance(t, torch.Tensor) or t.device.type not in self.device_types:
            return False
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return False
        if st.nbytes() == 0:  # the CUDA allocator hands out nullptr for 0 bytes, no block
            return False
        ev = Event("alloc", key, st.nbytes(), op if op is not None else self.op,
                   module if module is not None else self.module,
                   self.stage, tuple(t.shape), str(t.dtype).replace("torch.", ""))
        self.live[key] = ev
        self.events.append(ev)
        weakref.finalize(st, self._on_free, key)
        return True

    def _on_free(self, key: int) -> None:
        ev = self.live.pop(key, None)
        if ev is not None:
            self.events.append(Event("free", key, ev.nbytes, self.op, self.module, self.stage))

    def synthetic_alloc(self, nbytes: int, op: str, shape=(), dtype="", module: str | None = None) -> int:
        """A kernel-internal allocation the meta kernels do not show (workspace etc.)."""
        self._synthetic += 1
        key = -self._synthetic
        ev = Event("alloc", key, int(nbytes), op, self.module if module is None else module,
                   self.stage, tuple(shape), dtype)
        self.live[key] = ev
        self.events.append(ev)
        return key

    def synthetic_free(self, key: int, op: str | None = None, module: str | None = None) -> None:
        ev = self.live.pop(key, None)
        if ev is not None:
            self.events.append(Event("free", key, ev.nbytes, self.op if op is None else op,
                                     self.module if module is None else module, self.stage))

    def empty_cache(self, op: str = "empty_cache") -> None:
        """torch.cuda.empty_cache() here (only between calls: the replay releases cached memory)."""
        self.events.append(Event("empty_cache", 0, 0, op, self.module, self.stage))

    # -- shadows ------------------------------------------------------------------------
    def set_shadow(self, t: torch.Tensor, value: torch.Tensor) -> None:
        tid = id(t)
        self._shadow[tid] = value
        weakref.finalize(t, self._shadow.pop, tid, None)

    def shadow(self, t):
        return self._shadow.get(id(t))

    def _is_fake(self, t) -> bool:
        from torch._subclasses.fake_tensor import FakeTensor

        return isinstance(t, FakeTensor)

    def _shadow_of_arg(self, a):
        if isinstance(a, torch.Tensor):
            s = self._shadow.get(id(a))
            if s is not None:
                return s
            if not self._is_fake(a) and a.device.type == "cpu" and a.numel() <= SHADOW_NUMEL:
                return a.detach().clone()
            raise KeyError
        if isinstance(a, torch.device) and a.type != "cpu":
            return torch.device("cpu")
        if isinstance(a, str) and a.startswith(("cuda", "meta")):
            return "cpu"
        return a

    def _propagate_shadow(self, func, args, kwargs, out) -> None:
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if not outs or any(o.numel() > SHADOW_NUMEL for o in outs):
            return
        if func in _NO_SHADOW_OPS or any(tag in func.tags for tag in _NO_SHADOW_TAGS):
            return
        from torch.utils._mode_utils import no_dispatch

        # everything on real CPU tensors, below every mode (the fake mode is still active here)
        with no_dispatch():
            try:
                sargs = tree_map(self._shadow_of_arg, args)
                skwargs = tree_map(self._shadow_of_arg, kwargs)
            except KeyError:
                return
            try:
                res = func(*sargs, **skwargs)
            except Exception:
                return
        res_flat = [r for r in tree_flatten(res)[0] if isinstance(r, torch.Tensor)]
        if len(res_flat) != len(outs):
            return
        for o, r in zip(outs, res_flat):
            self.set_shadow(o, r)

    # -- dispatch -----------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SCALAR_OPS and self.shadows_enabled:
            s = self._shadow.get(id(args[0]))
            if s is not None:
                from torch.utils._mode_utils import no_dispatch

                with no_dispatch():
                    return s.item()
        if func is _aten.equal.default and self.shadows_enabled:
            # encode_prompt compares the token ids of a prompt longer than 77 tokens with the
            # truncated ones (only to log a warning): a value, computed from the shadows
            from torch.utils._mode_utils import no_dispatch

            try:
                sargs = tree_map(self._shadow_of_arg, args)
            except KeyError:
                sargs = None
            if sargs is not None:
                with no_dispatch():
                    return func(*sargs)
        prev_op = self.op
        self.op = _short(func)
        self.op_counts[self.op] = self.op_counts.get(self.op, 0) + 1
        try:
            rewrite = self.rewrites.get(func)
            out = rewrite(func, args, kwargs) if rewrite is not None else func(*args, **kwargs)
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.track(t)
            for hook in self.post_op_hooks:
                hook(func, args, kwargs, out)
            if self.shadows_enabled:
                self._propagate_shadow(func, args, kwargs, out)
        finally:
            self.op = prev_op
        return out
