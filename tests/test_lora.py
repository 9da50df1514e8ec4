"""--lora (pipe.load_lora_weights, peft) and --lora-fused: the adapter tensors against peft's own
injection, a LoRA file's header against the safetensors library, the equation against the
simulation (which loads the adapters through the real diffusers/peft code), and bad values."""

from __future__ import annotations

import copy
import json
import struct

import pytest

from sd_vram import cli
from sd_vram.formula import estimate
from sd_vram.formula import lora as lora_mod
from sd_vram.formula.options import InputError, Options

ALL_TARGETS = ",".join(lora_mod.UNET_TARGETS + lora_mod.TEXT_TARGETS)


def _write_safetensors(path, tensors: dict[str, tuple[str, tuple[int, ...]]], metadata=None):
    """A .safetensors file by the format's rule (8-byte LE length, JSON header, zero data)."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = {"F16": 2, "F32": 4}[dtype]
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(offset))
    return path


# --- the adapter tensors -----------------------------------------------------------------------

def test_adapters_are_what_peft_injects():
    """Names, order and bytes of every adapter tensor against peft's inject_adapter_in_model on
    the bundled SD1.5 models (meta device, fp16): to the byte."""
    pytest.importorskip("peft")
    from peft import LoraConfig, inject_adapter_in_model

    from sd_vram.simulation.resident import meta_pipeline

    pipe = meta_pipeline(False)
    spec = Options(lora=f"8:{ALL_TARGETS}").adapters
    for model in ("unet", "text_encoder"):
        m = copy.deepcopy(getattr(pipe, model))
        targets = sorted(lora_mod.TARGETS[model])
        inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=targets), m)
        # transformers 5's CLIPTextModel has no text_model. level (4's had)
        got = [(n.replace(".default", "").removeprefix("text_model."), tuple(p.shape), p.element_size() * p.numel())
               for n, p in m.named_parameters() if "lora_" in n]
        want = [(n, shape, 2 * shape[0] * shape[1]) for a in spec.adapters if a.model == model
                for n, shape, _ in a.tensors()]
        assert got == want
        assert all(p.dtype == getattr(pipe, model).dtype for n, p in m.named_parameters() if "lora_" in n)
    # rank 8: 8 x (in + out) per wrapped Linear. Per transformer of C channels the feed-forward's
    # ff.net.0.proj (C -> 8C) and ff.net.2 (4C -> C) give 14 C; the 16 transformers' C sum to
    # 2 (320 + 640 + 1280) down + 1280 mid + 3 (1280 + 640 + 320) up
    def unet_bytes(targets):
        return sum(2 * a.rank * (a.in_features + a.out_features) for a in spec.adapters
                   if a.model == "unet" and a.target in targets)

    assert unet_bytes(lora_mod.UNET_ATTENTION) == 2 * 8 * 199_296
    assert unet_bytes(lora_mod.UNET_FEED_FORWARD) == 2 * 8 * 14 * (2 * (320 + 640 + 1280) + 1280 + 3 * (1280 + 640 + 320))


def test_linear_modules_are_the_models_nn_linear_layers():
    """lora.linear_modules reads the Linear layers off architecture.py's weights; the built models'."""
    torch = pytest.importorskip("torch")
    from sd_vram.simulation.resident import meta_pipeline

    pipe = meta_pipeline(False)
    for model in ("unet", "text_encoder"):
        built = [(n.removeprefix("text_model."), m.in_features, m.out_features)
                 for n, m in getattr(pipe, model).named_modules() if isinstance(m, torch.nn.Linear)]
        assert list(lora_mod.linear_modules(model)) == built
        convs = {n for n, m in getattr(pipe, model).named_modules() if isinstance(m, torch.nn.Conv2d)}
        assert lora_mod.conv_modules(model) == convs


def test_rank_scales_the_adapter_bytes():
    def numel(spec):
        return sum(s[0] * s[1] for _, s, _ in Options(lora=spec).adapters.tensors())

    assert numel("32") == 2 * numel("16") == 4 * numel("8")
    assert numel("16:to_q,to_k,to_v,to_out.0") == numel("16")      # the default targets
    groups = (lora_mod.UNET_ATTENTION, lora_mod.UNET_FEED_FORWARD, lora_mod.TEXT_ATTENTION, lora_mod.TEXT_MLP)
    assert numel(f"16:{ALL_TARGETS}") == sum(numel("16:" + ",".join(g)) for g in groups)


def test_resident_weights_are_the_adapters_blocks():
    base, with_lora = estimate(512, 512, gpu="h200"), estimate(512, 512, gpu="h200", lora="16")
    adapters = with_lora.breakdown["lora_weights"]
    tensors = Options(lora="16").adapters.tensors()
    assert adapters == sum(-(-2 * s[0] * s[1] // 512) * 512 for _, s, _ in tensors)   # 512-B blocks
    assert with_lora.peak_allocated - base.peak_allocated == adapters   # attention-only: never at the peak
    fused = estimate(512, 512, gpu="h200", lora="16", lora_fused=True)
    assert fused.breakdown["lora_weights"] == adapters                 # fuse_lora keeps the adapters


def test_unfused_temporaries_only_inside_the_projections():
    """Unfused, each wrapped projection holds two output-sized temporaries while it runs: at
    attention they never pass the feed-forward's live set; inside GEGLU's proj they do."""
    from sd_vram.formula import activations as act

    s = act.Shape(H=512, W=512, n=1, B=2, cfg=True)
    ff = max(p.total for p in act.unet(s, "flash"))
    for targets in (frozenset({"to_q"}), frozenset(lora_mod.UNET_TARGETS)):
        for p in act.lora_unet_attention(s, targets):
            assert 0 < p.total < ff
    assert act.lora_unet_attention(s, frozenset()) == []
    # inside GEGLU's proj: its base output and two temporaries of (B*N, 8C) where GEGLU holds one of
    # 8C and two of 4C, so one (B*N, 8C) more; inside ff.net.2 less than GEGLU
    proj, out = act.lora_unet_feed_forward(s, frozenset(lora_mod.UNET_FEED_FORWARD))
    assert proj.total - ff == act.nbytes(2 * 64 * 64, 8 * 320)
    assert 0 < out.total < ff
    # the text encoder's fc1: as much as quick_gelu holds; fc2 less
    clip = max(p.total for p in act.text_encoder(s, "efficient"))
    fc1, fc2 = act.lora_text_mlp(s, frozenset(lora_mod.TEXT_MLP))
    assert fc2.total < fc1.total <= clip
    t = act.lora_linear_temporaries(s, 4096, 320)
    assert t.total == 2 * act.nbytes(4096, 320)


# --- a LoRA file's header ----------------------------------------------------------------------

def test_file_header_matches_safetensors_and_the_rank_form(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    torch = pytest.importorskip("torch")
    shapes = Options(lora="4:to_q,to_out.0,q_proj").adapters.state_dict_shapes()
    path = tmp_path / "lora.safetensors"
    safetensors.save_file({k: torch.zeros(s, dtype=torch.float32) for k, s in shapes.items()}, str(path),
                          metadata={"format": "pt"})
    header = lora_mod.read_safetensors_header(str(path))
    with safetensors.safe_open(str(path), "pt") as f:
        assert {k: tuple(header[k]["shape"]) for k in f.keys()} == {k: tuple(f.get_slice(k).get_shape())
                                                                    for k in f.keys()}
    from_file, from_rank = Options(lora=str(path)).adapters, Options(lora="4:to_q,to_out.0,q_proj").adapters
    assert from_file.adapters == from_rank.adapters           # fp32 in the file: fp16 on the GPU


def test_file_diffusers_keys_and_mixed_ranks(tmp_path):
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    k = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    te = "text_encoder.text_model.encoder.layers.3.self_attn.v_proj"
    path = _write_safetensors(tmp_path / "old.safetensors", {
        f"{q}.lora.down.weight": ("F16", (4, 320)), f"{q}.lora.up.weight": ("F16", (320, 4)),
        f"{k}.lora_A.weight": ("F32", (8, 768)), f"{k}.lora_B.weight": ("F32", (1280, 8)), f"{k}.alpha": ("F32", ()),
        f"{te}.lora_linear_layer.down.weight": ("F16", (2, 768)), f"{te}.lora_linear_layer.up.weight": ("F16", (768, 2)),
    })
    spec = Options(lora=str(path)).adapters
    assert [(a.model, a.target, a.rank) for a in spec.adapters] == [("unet", "to_q", 4), ("unet", "to_k", 8),
                                                                     ("text_encoder", "v_proj", 2)]
    assert spec.ranks == (2, 4, 8)


# --- bad values --------------------------------------------------------------------------------

@pytest.mark.parametrize("value,words", [
    ("0", "positive integer"), ("-4", "positive integer"), ("16:to_x", "'to_x' is no module of SD1.5"),
    ("16:proj_in", "'proj_in' is not modelled"), ("", "RANK[:TARGETS]"), ("no/such/file.safetensors", "cannot read"),
])
def test_bad_lora_values_give_one_line(value, words):
    with pytest.raises(InputError) as e:
        Options(lora=value)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_bad_lora_files_give_one_line(tmp_path):
    kohya = _write_safetensors(tmp_path / "kohya.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": ("F16", (4, 320))})
    linear = _write_safetensors(tmp_path / "linear.safetensors", {
        "unet.time_embedding.linear_1.lora_A.weight": ("F16", (4, 320)),
        "unet.time_embedding.linear_1.lora_B.weight": ("F16", (1280, 4))})
    conv = _write_safetensors(tmp_path / "conv.safetensors", {
        "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": ("F16", (4, 320, 1, 1)),
        "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": ("F16", (320, 4, 1, 1))})
    shape = _write_safetensors(tmp_path / "shape.safetensors", {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": ("F16", (4, 640)),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": ("F16", (320, 4))})
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    for path, words in ((kohya, "kohya keys"), (linear, "not modelled"), (conv, "a convolution, is not modelled"), (shape, "not (r, 320)"),
                        (garbage, "not safetensors JSON"), (short, "too short"), (tmp_path, "cannot read")):
        with pytest.raises(InputError) as e:
            Options(lora=str(path))
        assert words in str(e.value) and "\n" not in str(e.value), (path, e.value)


def test_lora_fused_needs_a_lora_and_the_cli_says_so_in_one_line(capsys):
    with pytest.raises(InputError, match="lora_fused needs a LoRA"):
        Options(lora_fused=True)
    assert cli.main(["estimate", "64x64", "--lora", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "positive integer" in err
    assert cli.main(["estimate", "64x64", "--lora", "16", "--lora-fused", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["options"]["lora_fused"] is True


# --- the equation against the simulation -------------------------------------------------------

@pytest.mark.parametrize("height,width,options", [
    (96, 64, {"lora": f"16:{ALL_TARGETS}"}),
    (160, 128, {"lora": "8", "lora_fused": True}),
    # no VAE: the UNet's level-0 feed-forward is the call's peak, inside the adapter of GEGLU's proj
    (384, 512, {"lora": "16:ff.net.0.proj", "pipeline": "txt2img", "output_type": "latent"}),
], ids=["unfused-96x64-unet+text", "fused-160x128", "unfused-ff-peak-txt2img-512x384"])
def test_equation_matches_simulation_with_lora(height, width, options):
    pytest.importorskip("peft")
    from sd_vram.formula.equation import _resident_of
    from sd_vram.formula.gpu_profiles import get
    from sd_vram.simulation import simulate

    opts = {"gpu": "h200", "num_inference_steps": 5, **options}
    e = estimate(height, width, prompt_length=20, **opts)
    sim = simulate(height, width, prompt_length=20, **opts)
    # resident: the simulation loaded the adapters through load_lora_weights (and fuse_lora)
    parts, _ = _resident_of(Options(**opts), get("h200"))
    assert sim.resident_allocated == sum(parts.values())
    msg = (f"equation {e.peak_allocated:,} / {e.peak_reserved:,} at {e.peak_stage}; simulation "
           f"{sim.peak_allocated:,} / {sim.peak_reserved:,} at {sim.peak_stage} ({sim.peak_operator})")
    assert abs(e.peak_allocated - sim.peak_allocated) / sim.peak_allocated <= 0.01, msg
    assert abs(e.peak_reserved - sim.peak_reserved) / sim.peak_reserved <= 0.03, msg
    assert e.peak_stage == sim.peak_stage, msg
    if not opts.get("lora_fused"):
        checked = _check_unfused_candidates(sim, Options(**opts), height, width, sum(parts.values()))
        assert checked == (7 if opts["lora"].endswith(ALL_TARGETS) else 1)
    if opts.get("pipeline") == "txt2img":
        assert "ff.net.0.proj (unfused LoRA)" in e.stages["unet"].operation, msg


def _check_unfused_candidates(sim, o, height, width, resident):
    """Each unfused-LoRA candidate live set against the simulation's highest allocated level in
    the first run of that module's events (peft's lora_A/lora_B modules are unnamed:
    "Linear"), within 1 % of the candidate's working set. Returns how many were checked."""
    from sd_vram.formula import activations as act
    from sd_vram.formula.equation import _stage_candidates
    from sd_vram.formula.gpu_profiles import get

    ev, level = sim.events, sim.allocated_series
    s = act.Shape(H=height, W=width, n=o.num_images_per_prompt, B=o.unet_batch, cfg=o.cfg)
    cands = _stage_candidates(s, o, get("h200"))
    block = "unet.up_blocks.3.attentions.0.transformer_blocks.0"
    layer = "text_encoder.encoder.layers.1"
    checked = 0
    for stage, module, operation in (
            ("unet", f"{block}.attn1", "attn1."), ("unet", f"{block}.attn2", "attn2."),
            ("unet", f"{block}.ff.net.0.proj", "ff.net.0.proj (unfused"), ("unet", f"{block}.ff.net.2", "ff.net.2 (unfused"),
            ("text_encoder", f"{layer}.self_attn", "self_attn."), ("text_encoder", f"{layer}.mlp.fc1", "mlp.fc1 "),
            ("text_encoder", f"{layer}.mlp.fc2", "mlp.fc2 ")):
        first = next(i for i, e in enumerate(ev) if i >= sim.call_start and e.module.startswith(module))
        last = first
        while ev[last + 1].module.startswith(module) or ev[last + 1].module == "Linear":
            last += 1
        for p in cands[stage]:
            if "unfused LoRA" in p.operation and operation in p.operation:
                simulated = max(level[first:last + 1]) - resident
                assert abs(p.total - simulated) <= 0.01 * simulated, (p.operation, p.total, simulated)
                checked += 1
    return checked


# --- the GPU backend ---------------------------------------------------------------------------

def test_gpu_backend_loads_the_cases_lora_and_unloads_it(monkeypatch):
    """plugin/gpu.py's LoRA steps around a measured call, on a stand-in pipeline: a CPU fp16
    state dict of the case's shapes, fuse with lora_fused, then unfuse and unload; a case
    without peft is skipped with the reason."""
    torch = pytest.importorskip("torch")
    from sd_vram.plugin import gpu

    calls = []

    class Pipe:
        def load_lora_weights(self, sd):
            calls.append(("load", {k: (tuple(v.shape), v.dtype, v.device.type) for k, v in sd.items()}))

        def fuse_lora(self):
            calls.append(("fuse",))

        def unfuse_lora(self):
            calls.append(("unfuse",))

        def unload_lora_weights(self):
            calls.append(("unload",))

    b = object.__new__(gpu.CudaBackend)
    b.torch, b.pipe = torch, Pipe()
    for fused in (True, False):
        calls.clear()
        opts = Options(lora="4:to_q,q_proj", lora_fused=fused)
        b._configure_lora(opts)
        b._unload_lora()
        b._unload_lora()                     # nothing loaded: nothing to do
        want = {k: (s, torch.float16, "cpu") for k, s in opts.adapters.state_dict_shapes().items()}
        assert calls == [("load", want)] + ([("fuse",), ("unfuse",)] if fused else []) + [("unload",)]
    calls.clear()
    b._configure_lora(Options())
    b._unload_lora()
    assert calls == []
    assert gpu.lora_unavailable(Options()) is None
    monkeypatch.setitem(__import__("sys").modules, "peft", None)   # import peft raises ImportError
    reason = gpu.lora_unavailable(Options(lora="16"))
    assert reason and "peft" in reason and "\n" not in reason


def test_a_budget_can_run_out_while_the_adapters_load():
    """Under --vram, the adapters are allocated after the weights: a card with room for the
    weights but not a large adapter fails in load_lora_weights, naming the tensor."""
    from sd_vram.formula.equation import _resident_of
    from sd_vram.formula.gpu_profiles import get

    profile = get("h200")
    parts, _ = _resident_of(Options(), profile)
    vram = profile.cuda_context + sum(parts.values()) + (100 << 20)
    assert estimate(64, 64, gpu="h200", vram=vram).boundary.verdict != "oom"
    big = estimate(64, 64, gpu="h200", lora="512", vram=vram).boundary        # 204 MB of UNet adapters
    assert big.verdict == "oom" and big.oom.stage == "setup"
    assert big.oom.operation.startswith("pipe.load_lora_weights: ") and big.oom.operation.endswith(".weight")
