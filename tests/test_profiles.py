"""GPU profile files (round trip, bad files, lookup by name or path) and the bounds."""

import glob
import json

import pytest

from sd_vram.formula import estimate, gpu_profiles, kernels
from sd_vram.formula.options import InputError

MiB = 1 << 20


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    d = tmp_path / "profiles"
    monkeypatch.setenv("SD_VRAM_PROFILES", str(d))
    return d


def _probed(**changes):
    p = gpu_profiles.get("h200").with_(
        name="mine", source="probe", cuda_context=600 * MiB, cuda_context_measured=True,
        conv_workspaces={"vae.decoder.up_blocks.2.upsamplers.0.conv@1x256x512x512": 600 * MiB},
        stack={"torch": "2.11.0+cu130", "cudnn": 91900, "CUBLAS_WORKSPACE_CONFIG": None})
    return p.with_(**changes)


def test_round_trip(tmp_path):
    p = _probed(conv_workspace_rules=({"module": "^unet", "kernel": 3, "formula": "output"},))
    path = gpu_profiles.write(p, tmp_path / "mine.json", sdpa=[{"backend": "CUDNN_ATTENTION"}])
    back = gpu_profiles.read(path)
    assert back.with_(path="") == p.with_(path="")
    assert json.loads(path.read_text())["schema"] == gpu_profiles.SCHEMA
    for name in gpu_profiles.profiles():                       # the bundled files too
        b = gpu_profiles.get(name)
        assert gpu_profiles.from_json(gpu_profiles.to_json(b), "x").with_(path="", source="bundled") == b.with_(path="")


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.pop("gpu"), "'gpu' is missing"),
    (lambda d: d.update(cuda_context=-1), "'cuda_context'"),
    (lambda d: d.update(compute_capability=[9]), "'compute_capability'"),
    (lambda d: d.update(conv_workspace_rule="fast"), "'conv_workspace_rule'"),
    (lambda d: d.update(conv_workspace_rules=[{"module": "", "formula": "input ** 2"}]), "'conv_workspace_rules'"),
    (lambda d: d.update(conv_workspaces={"unet.conv_in": 5}), "'conv_workspaces'"),
    (lambda d: d.update(schema="sd-vram/gpu-profile/0"), "'schema'"),
    (lambda d: d.update(turbo=True), "'turbo'"),
])
def test_bad_files_name_the_file_and_field(tmp_path, edit, field):
    d = gpu_profiles.to_json(_probed())
    edit(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(InputError) as e:
        gpu_profiles.get(str(path))
    msg = str(e.value)
    assert str(path) in msg and field in msg and "\n" not in msg


def test_not_json_and_missing_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{nope")
    with pytest.raises(InputError, match="not JSON"):
        gpu_profiles.get(str(path))
    with pytest.raises(InputError, match="no such file"):
        gpu_profiles.get(str(tmp_path / "gone.json"))


def test_user_folder_first_then_bundled(user_dir):
    assert gpu_profiles.get("h200").source == "bundled"
    gpu_profiles.write(_probed(name="h200"), user_dir / "h200.json")
    assert gpu_profiles.get("h200").source == "probe"              # the user's probe wins
    assert estimate(512, 512, gpu="h200").breakdown["cuda_context"] == 600 * MiB
    with pytest.raises(InputError, match="known: default, h100, h200"):
        gpu_profiles.get("h300")


def test_user_dir_default_is_platformdirs(monkeypatch):
    from platformdirs import user_data_dir

    monkeypatch.delenv("SD_VRAM_PROFILES", raising=False)
    assert str(gpu_profiles.user_dir()).startswith(user_data_dir("sd-vram", appauthor=False))


def test_for_stack_picks_the_same_gpu_and_stack(user_dir):
    p = _probed()
    gpu_profiles.write(p, user_dir / "mine.json")
    assert gpu_profiles.for_stack("NVIDIA H200", dict(p.stack)).name == "mine"
    assert gpu_profiles.for_stack("NVIDIA H200", {**p.stack, "CUBLAS_WORKSPACE_CONFIG": ":16:8"}) is None
    assert gpu_profiles.for_stack("NVIDIA H100 80GB HBM3", dict(p.stack)) is None


def test_a_measured_shape_beats_the_rule():
    p = _probed()
    e = estimate(512, 512, gpu=p)
    rule = estimate(512, 512, gpu=p.with_(conv_workspaces={}))
    assert e.conv_workspace == "measured+rule" and rule.conv_workspace == "rule nchw_transpose"
    # the decoder's upsampler conv, measured at 600 MiB instead of the rule's 257 MiB
    assert e.stages["vae_decode"].components["workspace"] == 600 * MiB
    assert rule.stages["vae_decode"].components["workspace"] == 2 * 256 * 512 * 512 * 2 + 256 * 256 * 9 * 2


# --- bounds ----------------------------------------------------------------------------------------

CALLS = [(64, 64, {}), (427, 640, {}), (1024, 1024, {}), (3024, 4032, {}), (512, 512, {"num_images_per_prompt": 2}),
         (2048, 2048, {"vae_tiling": True}), (768, 768, {"attention": "math"})]


@pytest.mark.parametrize("height,width,options", CALLS)
@pytest.mark.parametrize("gpu", ["default", "h200"])
def test_lo_point_hi(height, width, options, gpu):
    e = estimate(height, width, gpu=gpu, **options)
    for key, point in (("peak_allocated_bytes", e.peak_allocated), ("peak_reserved_bytes", e.peak_reserved),
                       ("peak_device_bytes", e.peak_device)):
        lo, hi = e.bounds[key]
        assert lo <= point <= hi, key
    assert e.bounds["peak_reserved_bytes"][0] < e.bounds["peak_reserved_bytes"][1]  # conv workspaces unmeasured
    ctx = e.bounds["peak_device_bytes"][1] - e.bounds["peak_reserved_bytes"][1]
    assert ctx == (1 << 30 if gpu == "default" else gpu_profiles.get(gpu).cuda_context)
    # hi: the heaviest rule set on record and the equation's band above the point
    assert e.bounds["peak_allocated_bytes"][1] >= e.peak_allocated * 1.01


def _every_conv_measured(height, width, ruled="h200", **options):
    """A probed h200 profile that holds the workspace profile `ruled` gives every conv the call
    asks for (the keys of the call's layout)."""
    asked = {}
    original = kernels.ConvWorkspace.__call__

    def spy(self, module, kernel, input_shape, i, o, w):
        n = original(self, module, kernel, input_shape, i, o, w)
        asked.setdefault(kernels.conv_key(module, input_shape, self.nhwc), n)   # the point, not the bounds
        return n

    kernels.ConvWorkspace.__call__ = spy
    try:
        estimate(height, width, gpu=ruled, **options)
    finally:
        kernels.ConvWorkspace.__call__ = original
    return gpu_profiles.get("h200").with_(source="probe", conv_workspaces=asked)


@pytest.mark.parametrize("height,width,options", [(427, 640, {}), (2048, 2048, {"vae_tiling": True})])
def test_lo_equals_hi_when_fully_measured(height, width, options):
    p = _every_conv_measured(height, width, **options)
    e, rule = estimate(height, width, gpu=p, **options), estimate(height, width, gpu="h200", **options)
    assert e.conv_workspace == "measured"
    assert (e.peak_allocated, e.peak_reserved, e.peak_device) == (rule.peak_allocated, rule.peak_reserved,
                                                                 rule.peak_device)
    assert e.bounds == {"peak_allocated_bytes": [e.peak_allocated] * 2, "peak_reserved_bytes": [e.peak_reserved] * 2,
                        "peak_device_bytes": [e.peak_device] * 2}
    from sd_vram.formula.equation import verdict_range

    assert verdict_range(height, width, vram=e.peak_device, gpu=p, **options) is None   # nothing to range over
    # the context alone unmeasured: a range again
    open_ctx = estimate(height, width, gpu=p.with_(cuda_context_measured=False), **options).bounds
    assert open_ctx["peak_device_bytes"][0] < e.peak_device < open_ctx["peak_device_bytes"][1]


def test_channels_last_closes_its_bounds_only_with_its_nhwc_convs_probed():
    """kernels.py section 4b: an unprobed NHWC workspace is derived (none) and leaves the bounds
    open; `sd-vram probe --channels-last` measures them under ":nhwc" keys, which the channels-last
    call uses, and the NCHW call does not."""
    h200 = gpu_profiles.get("h200")
    ruled = h200.with_(name="nhwc-ruled", conv_workspace_rule_nhwc="nchw_transpose")
    p = _every_conv_measured(427, 640, ruled=ruled, channels_last=True)
    assert p.conv_workspaces and all(k.endswith(":nhwc") for k in p.conv_workspaces)
    e, rule = (estimate(427, 640, gpu=g, channels_last=True) for g in (p, ruled))
    assert e.conv_workspace == "measured"
    assert (e.peak_allocated, e.peak_reserved) == (rule.peak_allocated, rule.peak_reserved)
    assert e.bounds["peak_allocated_bytes"] == [e.peak_allocated] * 2
    assert e.bounds["peak_device_bytes"] == [e.peak_device] * 2
    unprobed = estimate(427, 640, gpu="h200", channels_last=True)
    assert unprobed.peak_allocated < e.peak_allocated           # the workspaces it took as none
    assert unprobed.bounds["peak_allocated_bytes"][0] < unprobed.peak_allocated < unprobed.bounds["peak_allocated_bytes"][1]
    nchw = estimate(427, 640, gpu=p)
    assert nchw.conv_workspace == "rule nchw_transpose"
    assert nchw.peak_allocated == estimate(427, 640, gpu="h200").peak_allocated


def _archived_cases():
    for f in sorted(glob.glob("results/*/*.json")):
        data = json.load(open(f, encoding="utf-8"))
        if not str(data.get("schema", "")).startswith("sd-vram/results/"):
            continue
        expandable = "expandable_segments:True" in str(data["environment"]["env"].get("PYTORCH_CUDA_ALLOC_CONF"))
        for case in data["cases"]:
            if case["measurement"].get("status") == "ok":
                yield f, case, expandable


def test_no_archived_setting_is_called_derived():
    """Options.derived_settings names what no GPU run measured: nothing of an archived case."""
    from sd_vram.formula import Options, allocconf

    for f, case, _ in _archived_cases():
        env = json.load(open(f, encoding="utf-8"))["environment"]["env"]
        o = Options(**case["inputs"]["options"], alloc_conf=allocconf.from_environment(env))
        assert o.derived_settings == (), (f, case["id"], o.derived_settings)
    assert Options(attention="flash", dtype="bf16").derived_settings == ("dtype bf16", "attention flash")


def test_every_archived_measurement_lies_inside_the_default_bounds():
    """The issue's done-when, on the archives: no measured peak outside [lo, hi] of `default`."""
    n = 0
    for f, case, expandable in _archived_cases():
        inp, m = case["inputs"], case["measurement"]
        e = estimate(inp["height"], inp["width"], prompt=inp.get("prompt"),
                     **{**inp["options"], "gpu": "default", "expandable_segments": expandable})
        for q in ("allocated", "reserved", "device"):
            lo, hi = e.bounds[f"peak_{q}_bytes"]
            assert lo <= m[f"peak_{q}_bytes"] <= hi, f"{f} {case['id']} {q}: {m[f'peak_{q}_bytes']:,} not in [{lo:,}, {hi:,}]"
        n += 1
    assert n >= 100


# --- the command line ------------------------------------------------------------------------------

def test_cli_json_always_holds_bounds_and_the_table_a_range(capsys, tmp_path):
    from sd_vram import cli

    assert cli.main(["estimate", "640x427", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert set(d["bounds"]) == {"peak_allocated_bytes", "peak_reserved_bytes", "peak_device_bytes"}
    assert d["bounds"]["peak_device_bytes"][0] <= d["peak_device_bytes"] <= d["bounds"]["peak_device_bytes"][1]
    assert d["gpu_profile"] == "default" and d["conv_workspace"] == "rule nchw_transpose"
    assert cli.main(["estimate", "640x427"]) == 0
    out = capsys.readouterr().out
    assert "device    between" in out and "sd-vram probe" in out
    # a profile file that measured every term: exact, no range
    p = _every_conv_measured(427, 640)
    path = gpu_profiles.write(p.with_(name="exact"), tmp_path / "exact.json")
    assert cli.main(["estimate", "640x427", "--gpu-profile", str(path)]) == 0
    out = capsys.readouterr().out
    assert "device    between" not in out and "the figures are exact" in out


@pytest.mark.parametrize("command", [["estimate", "64x64"], ["max-size", "--vram", "8GiB"], ["compare", "results/H200"]])
def test_cli_bad_profile_file_is_one_line(capsys, tmp_path, command):
    from sd_vram import cli

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**gpu_profiles.to_json(_probed()), "cuda_context": "lots"}))
    assert cli.main([*command, "--gpu-profile", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and "'cuda_context'" in err
