"""The sd-vram command line: outputs, JSON, one-line errors, image files, max-size, cold start.

The tests run against the real equation when it works and against a stand-in Estimate
(fake_estimate below) until then, so the CLI's code paths are checked either way; nothing
here asserts a figure of the equation itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import sd_vram.formula.equation as equation
from sd_vram.cli import main, parse_aspect, parse_budget, parse_size
from sd_vram.formula import InputError, Options, tokenizer
from sd_vram.formula.maxsize import max_size, smallest_height, width_for
from sd_vram.formula.result import Estimate, StagePeak
from sd_vram.output import fmt_bytes

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def fake_estimate(height, width, prompt=None, prompt_length=None, **options):
    """A stand-in with the equation's signature and an Estimate that grows with the image."""
    o = Options(**options)
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 8:
            raise InputError(f"{name} must be an integer >= 8, got {v!r}")
    if prompt is not None and prompt_length is not None:
        raise InputError("give prompt or prompt_length, not both")
    H, W = height - height % 8, width - width % 8
    tokens = tokenizer.count_tokens(prompt) if prompt is not None else prompt_length
    weights = 2_000_000_000 + (600_000_000 if o.safety_checker else 0)
    act = 3000 * H * W * o.num_images_per_prompt
    alloc = weights + act
    reserved = alloc + alloc // 50
    stages = {
        "setup": StagePeak(weights, weights, {"weights": weights}, ""),
        "unet": StagePeak(weights + act // 3, weights + act // 3, {"weights": weights, "activations": act // 3}, "attention"),
        "vae_decode": StagePeak(alloc, reserved, {"weights": weights, "activations": act}, "conv"),
    }
    return Estimate(H, W, tokens, bool(tokens is not None and tokens > 75), alloc, reserved, reserved + 500 * 2**20,
                    "vae_decode", stages, {"unet_weights": 1_700_000_000, "other_weights": weights - 1_700_000_000,
                                           "activations": act}, o.to_dict(), o.gpu)


def _real_equation_works() -> bool:
    try:
        equation.estimate(427, 640)
        return True
    except NotImplementedError:
        return False


REAL = _real_equation_works()


@pytest.fixture(autouse=True)
def _equation(monkeypatch, no_shell_alloc_conf):
    if not REAL:
        monkeypatch.setattr(equation, "estimate", fake_estimate)


def run_cli(*args, timeout=60):
    """`sd-vram ARGS` in a fresh interpreter (with the stand-in patched in while the equation is missing)."""
    boot = (
        "import sys\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        + ("" if REAL else "import sd_vram.formula.equation as e, test_cli; e.estimate = test_cli.fake_estimate\n")
        + "from sd_vram.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run([sys.executable, "-c", boot, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=str(REPO), env={**os.environ, "PYTHONWARNINGS": "ignore"})


def call(capsys, *args):
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------------------
# estimate
# ------------------------------------------------------------------------------------------

def test_estimate_table(capsys):
    rc, out, err = call(capsys, "estimate", "640x427", "--prompt", "a hot air balloon over a green field")
    assert rc == 0 and err == ""
    est = equation.estimate(427, 640, prompt="a hot air balloon over a green field")
    assert "640x424" in out                          # width x height after rounding down to 8
    assert f"{est.prompt_tokens} CLIP tokens" in out
    for stage in est.stages:
        assert stage in out
    peak_line = next(line for line in out.splitlines() if "<- peak" in line)
    assert peak_line.startswith(est.peak_stage)
    for label in ("allocator overhead (reserved - allocated)", "CUDA context", "peak device", "peak reserved",
                  "peak allocated"):
        assert label in out
    assert "GiB" in out or "MiB" in out
    from sd_vram.output import label as _label

    for key, value in est.breakdown.items():
        if key not in ("allocator_overhead", "cuda_context"):   # those have their own lines
            assert any(_label(key) in line and fmt_bytes(value) in line for line in out.splitlines()), key
    assert fmt_bytes(est.peak_device) in out and fmt_bytes(est.peak_reserved - est.peak_allocated) in out


def test_estimate_json_is_estimate_to_dict(capsys):
    rc, out, err = call(capsys, "estimate", "640x427", "--prompt-length", "53", "--json")
    assert rc == 0
    d = json.loads(out)
    assert d == json.loads(json.dumps(equation.estimate(427, 640, prompt_length=53).to_dict()))
    for key in ("peak_allocated_bytes", "peak_reserved_bytes", "peak_device_bytes", "peak_stage", "breakdown"):
        assert key in d
    assert (d["width"], d["height"]) == (640, 424)
    assert d["peak_allocated_bytes"] <= d["peak_reserved_bytes"] <= d["peak_device_bytes"]


def test_options_reach_the_equation(capsys, monkeypatch):
    seen = {}

    def spy(height, width, **kw):
        seen.update(kw, height=height, width=width)
        return fake_estimate(height, width, **kw)

    monkeypatch.setattr(equation, "estimate", spy)
    rc, _, err = call(capsys, "estimate", "800x533", "--prompt", "groceries", "--guidance-scale", "1",
                      "--num-images-per-prompt", "2", "--strength", "0.5", "--steps", "20", "--attention", "math",
                      "--attention-slicing", "max", "--vae-slicing", "--vae-tiling", "--no-safety-checker",
                      "--output-type", "np", "--gpu-profile", "default", "--json")
    assert rc == 0, err
    assert seen == {"height": 533, "width": 800, "prompt": "groceries", "guidance_scale": 1.0,
                    "num_images_per_prompt": 2, "strength": 0.5, "num_inference_steps": 20, "attention": "math",
                    "attention_slicing": "max", "vae_slicing": True, "vae_tiling": True, "safety_checker": False,
                    "output_type": "np", "gpu": "default"}
    seen.clear()
    assert call(capsys, "estimate", "800x533", "--attention-slicing", "4")[0] == 0
    assert seen["attention_slicing"] == 4 and "prompt" not in seen and "prompt_length" not in seen


def test_every_options_field_has_a_flag():
    """The flags are generated from sd_vram/option_flags.py's table: a new field of Options needs a row."""
    from sd_vram.option_flags import missing_flags

    missing = missing_flags()
    assert not missing, f"Options fields without a command-line flag (add a row to sd_vram/option_flags.py): {missing}"


def test_each_flag_sets_its_field(capsys, monkeypatch):
    from dataclasses import fields as dc_fields

    from sd_vram.option_flags import option_flags

    seen = {}
    monkeypatch.setattr(equation, "estimate", lambda h, w, **kw: (seen.update(kw), fake_estimate(h, w, **kw))[1])
    values = {"attention": "math", "output_type": "latent", "attention_slicing": "max", "gpu": "h200",
              "alloc_conf": "max_split_size_mb:128", "guidance_scale": "3", "strength": "0.5", "scheduler": "euler", "dtype": "fp32",
              "pipeline": "txt2img", "pipe_height": "64", "pipe_width": "64", "mask_size": "64x64", "inpaint_unet": "inpainting"}
    # a pipeline's own options are given with that pipeline (and inpaint's with its mask): alone, on img2img,
    # they are an error
    companions = {"pipe_height": {"pipeline": "txt2img"}, "pipe_width": {"pipeline": "txt2img"},
                  "mask_size": {"pipeline": "inpaint"},
                  "inpaint_unet": {"pipeline": "inpaint", "mask_size": "64x64"},
                  "padding_mask_crop": {"pipeline": "inpaint", "mask_size": "64x64"},
                  "lora_fused": {"lora": "4"}}
    flag_of = {f.field: f.flag for f in option_flags()}
    for f in option_flags():
        seen.clear()
        given = [f.flag] if f.switch is not None else [f.flag, values.get(f.field, "3")]
        extra = [x for field, v in companions.get(f.field, {}).items() for x in (flag_of[field], v)]
        assert call(capsys, "estimate", "64x64", *given, *extra, "--json")[0] == 0, f.flag
        assert sorted(seen) == sorted([f.field, *companions.get(f.field, {})]), (f.flag, seen)
        assert seen[f.field] != getattr(Options(), f.field), f.flag
    assert {f.field for f in option_flags()} == {f.name for f in dc_fields(Options)}


def test_truncation_warning(capsys):
    long_prompt = " ".join(["castle"] * 90)
    rc, out, err = call(capsys, "estimate", "640x427", "--prompt", long_prompt)
    assert rc == 0
    assert "warning" in err and "90 CLIP tokens" in err and "75" in err and "77" in err
    assert len(err.strip().splitlines()) == 1
    rc, out, err = call(capsys, "estimate", "640x427", "--prompt", "a castle")
    assert rc == 0 and "warning" not in err


def test_compare_table_and_json(capsys):
    from sd_vram.formula import baselines

    rc, out, err = call(capsys, "estimate", "640x427", "--compare")
    assert rc == 0, err
    for b in baselines.BASELINES:
        assert b.name in out and b.counts in out
    assert "sd-vram device" in out and "what it counts" in out
    rc, out, err = call(capsys, "estimate", "640x427", "--compare", "--json")
    d = json.loads(out)
    assert d["compare"]["ComfyUI"] == baselines.comfyui(427, 640, 77, Options())
    assert d["compare"]["sd-vram device"] == d["peak_device_bytes"]


def test_seed_case_by_name(capsys):
    rc, out, err = call(capsys, "estimate", "truck", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert (d["width"], d["height"]) == (1800, 1200)   # truck--high-res.jpg, 1800 x 1200
    rc, out, err = call(capsys, "estimate", "balloon", "--json")
    d = json.loads(out)
    assert (d["width"], d["height"]) == (392, 376)     # balloon--low-res.jpeg, 396 x 380, rounded down
    assert d["prompt_tokens"] == 53   # the balloon prompt (catalogue) or its token count (built-in table)


def test_catalogue_cases_by_name(capsys, monkeypatch):
    tomllib = pytest.importorskip("tomllib")
    path = REPO / "cases" / "catalogue.toml"
    if not path.exists():
        pytest.skip("cases/catalogue.toml not present")
    cases = [c for c in tomllib.loads(path.read_text(encoding="utf-8")).get("case", []) if not c.get("image")]
    with_options = [c for c in cases if c.get("options")]
    assert cases and with_options
    seen = {}

    def spy(height, width, **kw):
        seen.update(kw, height=height, width=width)
        return fake_estimate(height, width, **kw)

    monkeypatch.setattr(equation, "estimate", spy)
    case = with_options[0]
    rc, out, err = call(capsys, "estimate", case["name"], "--json")
    assert rc == 0, err
    assert (seen.pop("height"), seen.pop("width")) == (case["height"], case["width"])
    assert "prompt" in seen
    for k, v in case["options"].items():
        assert seen[k] == v
    # the command line wins over the case's options
    rc, out, err = call(capsys, "estimate", case["name"], "--guidance-scale", "9", "--json")
    assert seen["guidance_scale"] == 9.0


def test_a_broken_catalogue_is_one_line(capsys, monkeypatch, tmp_path):
    """The catalogue is read and validated by plugin/cases.py: a broken one is an error, not ignored."""
    (tmp_path / "cases").mkdir()
    (tmp_path / "cases" / "catalogue.toml").write_text('schema = "sd-vram/cases/0"\n')
    monkeypatch.chdir(tmp_path)
    rc, out, err = call(capsys, "estimate", "balloon")
    assert rc == 2 and not out
    assert err.startswith("sd-vram: error: ") and "schema must be" in err and len(err.splitlines()) == 1
    assert call(capsys, "estimate", "640x427")[0] == 0      # a size needs no catalogue


# ------------------------------------------------------------------------------------------
# image files
# ------------------------------------------------------------------------------------------

def _jpeg(path, size, orientation=None):
    Image = pytest.importorskip("PIL.Image")
    img = Image.new("RGB", size, (200, 100, 50))
    if orientation is None:
        img.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(path, exif=exif)
    return str(path)


@pytest.mark.parametrize("orientation,expected", [(None, (640, 427)), (1, (640, 427)), (3, (640, 427)),
                                                  (5, (427, 640)), (6, (427, 640)), (7, (427, 640)), (8, (427, 640))])
def test_image_size_applies_exif_orientation(tmp_path, orientation, expected):
    from sd_vram.imagesize import image_size

    path = _jpeg(tmp_path / "photo.jpg", (640, 427), orientation)
    assert image_size(path) == expected
    # as diffusers.utils.load_image would see it
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        assert ImageOps.exif_transpose(img).size == expected


def test_estimate_from_rotated_jpeg(tmp_path, capsys):
    path = _jpeg(tmp_path / "rotated.jpg", (640, 427), orientation=6)   # stored landscape, shown portrait
    rc, out, err = call(capsys, "estimate", path, "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert (d["width"], d["height"]) == (424, 640)   # 427 wide after the rotation, rounded down to 424


def test_estimate_from_png_in_subprocess(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    path = tmp_path / "img.png"
    Image.new("RGB", (800, 533)).save(path)
    r = run_cli("estimate", str(path), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["width"], d["height"]) == (800, 528)


# ------------------------------------------------------------------------------------------
# one-line errors
# ------------------------------------------------------------------------------------------

def _bad_inputs(tmp):
    garbage = tmp / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg at all")
    empty = tmp / "empty.png"
    empty.write_bytes(b"")
    return [
        ["estimate", "0x427"], ["estimate", "640x0"], ["estimate", "-640x427"], ["estimate", "640x-427"],
        ["estimate", "640.5x427"], ["estimate", "4x4"], ["estimate", "7x640"],
        ["estimate", "640x"], ["estimate", "x427"], ["estimate", "640*427"], ["estimate", "abc"], ["estimate", ""],
        ["estimate", str(tmp / "missing.jpg")], ["estimate", str(garbage)], ["estimate", str(empty)],
        ["estimate", str(tmp)],
        ["estimate", "640x427", "--bogus"], ["estimate", "640x427", "--steps", "many"],
        ["estimate", "640x427", "--prompt", "a cat", "--prompt-length", "3"],
        ["estimate", "640x427", "--prompt-length", "-1"], ["estimate", "640x427", "--prompt-length", "2.5"],
        ["estimate", "640x427", "--strength", "1.5"], ["estimate", "640x427", "--steps", "0"],
        ["estimate", "640x427", "--attention", "sage"], ["estimate", "640x427", "--attention-slicing", "0"],
        ["estimate", "640x427", "--num-images-per-prompt", "0"], ["estimate"], [], ["frobnicate"],
        ["max-size", "--vram", "abc"],
        ["max-size", "--vram", "-8GiB"], ["max-size", "--vram", "0"], ["max-size", "--vram", "8XB"],
        ["max-size", "--vram", "8GiB", "--aspect", "3:0"], ["max-size", "--vram", "8GiB", "--aspect", "0:2"],
        ["max-size", "--vram", "8GiB", "--aspect", "wide"], ["max-size"],
        ["max-size", "--vram", "8GiB", "--quantity", "virtual"],
    ]


def test_every_bad_input_is_one_line_in_process(tmp_path, capsys):
    for argv in _bad_inputs(tmp_path):
        rc = main(argv)
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert rc == 2, (argv, rc, err)
        assert len(lines) == 1 and lines[0].startswith("sd-vram: error: "), (argv, err)
        assert "Traceback" not in err + out, argv


def test_bad_inputs_in_subprocess(tmp_path):
    for argv in _bad_inputs(tmp_path)[::3]:   # every third case: a fresh process each costs ~0.2 s
        r = run_cli(*argv)
        assert r.returncode == 2, (argv, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, (argv, r.stderr)


def test_specific_error_messages(tmp_path, capsys):
    assert "malformed size '640x'" in call(capsys, "estimate", "640x")[2]
    assert "at least 8 px" in call(capsys, "estimate", "4x427")[2]
    assert "no such image file" in call(capsys, "estimate", str(tmp_path / "nope.png"))[2]
    assert "not allowed with argument --prompt" in call(capsys, "estimate", "640x427", "--prompt", "x",
                                                         "--prompt-length", "1")[2]
    assert "zero side" in call(capsys, "max-size", "--vram", "8GiB", "--aspect", "3:0")[2]



def test_nothing_fits_is_an_answer_not_an_error(capsys):
    """max-size: a budget below the weights is a valid question; its answer goes to stdout, exit 1."""
    for budget in ("1GiB", "100MiB"):
        rc, out, err = call(capsys, "max-size", "--vram", budget)
        assert (rc, err) == (1, "") and out.startswith("nothing fits a budget of ")
    assert "the weights and CUDA context alone need" in out
    rc, out, _ = call(capsys, "max-size", "--vram", "1GiB", "--json")
    assert rc == 1 and json.loads(out)["width"] is None


# ------------------------------------------------------------------------------------------
# parsing helpers
# ------------------------------------------------------------------------------------------

def test_parse_budget():
    gib = (8 * 2**30, "GiB, 2^30 B")
    assert parse_budget("8GiB") == parse_budget("8 GiB") == parse_budget("8G") == parse_budget("8gi") == gib
    assert parse_budget("8GB") == parse_budget("8gb") == (8 * 10**9, "GB, 10^9 B")   # decimal, as card boxes
    assert parse_budget("8192MiB")[0] == 8 * 2**30 and parse_budget("8000MB")[0] == 8 * 10**9
    assert parse_budget("7.5GiB")[0] == int(7.5 * 2**30)
    assert parse_budget("123456789") == (123_456_789, "bytes")        # a bare byte count of >= 1 MiB
    for bad in ("abc", "-8GiB", "8XB", "0", "0GiB", "", "GiB", "8 G i B", "8.5.5G", "2PiB", "9" * 5000):
        with pytest.raises(InputError):
            parse_budget(bad)


def test_a_budget_without_a_unit_is_refused_with_a_hint(capsys):
    """`--vram 8` used to mean 8 bytes, silently."""
    rc, out, err = call(capsys, "max-size", "--vram", "8")
    assert rc == 2 and "has no unit and would be 8 bytes: write e.g. 8GiB or 8GB" in err


def test_budgets_beyond_any_card_or_the_named_one_are_refused(capsys):
    rc, _, err = call(capsys, "estimate", "balloon", "--vram", "2048TiB")
    assert rc == 2 and "beyond any GPU" in err
    rc, _, err = call(capsys, "estimate", "balloon", "--gpu-profile", "h200", "--vram", "200GiB")
    assert rc == 2 and "more than the NVIDIA H200's 150,109,880,320 B" in err and len(err.splitlines()) == 1


def test_small_budgets_print_their_unit(capsys):
    """`--vram 1KiB` used to report "0.0 MiB", and any failure was blamed on the weights."""
    rc, out, _ = call(capsys, "max-size", "--vram", "1048576")
    assert rc == 1 and "1.00 MiB" in out and "the weights and CUDA context alone need" in out
    # a budget the weights fit but the smallest image does not (CUDA context + weights ~ 3.3 GiB)
    from sd_vram.formula import estimate

    small = estimate(8, 8)
    rc, out, _ = call(capsys, "max-size", "--vram", str(small.peak_device - 1))
    assert rc == 1 and "the smallest image, 8x8, needs" in out


def test_parse_size_and_aspect():
    assert parse_size("640x427") == (640, 427) and parse_size("640X427") == (640, 427)
    for bad in ("640x", "x427", "640*427", "abc", "0x427", "640x7", "640.0x427"):
        with pytest.raises(InputError):
            parse_size(bad)
    assert parse_aspect("3:2") == (3, 2) and parse_aspect("16:9") == (16, 9)
    for bad in ("3:0", "0:3", "3", "3:2:1", "a:b", "-3:2"):
        with pytest.raises(InputError):
            parse_aspect(bad)


# ------------------------------------------------------------------------------------------
# max-size
# ------------------------------------------------------------------------------------------

def _peak(h, w, quantity="device", **opts):
    est = equation.estimate(h, w, **opts)
    return {"allocated": est.peak_allocated, "reserved": est.peak_reserved, "device": est.peak_device}[quantity]


@pytest.mark.parametrize("aspect", [(1, 1), (3, 2), (2, 3), (16, 9), (4, 3)])
@pytest.mark.parametrize("quantity", ["device", "allocated"])
def test_max_size_is_exact(aspect, quantity):
    """device: on a card of the budget, as estimate --vram decides; allocated: the peak."""
    budget = 8 * 2**30

    def fits(h, w):
        if quantity == "device":
            return equation.estimate(h, w, vram=budget).boundary.verdict == "fits"
        return _peak(h, w, quantity) <= budget

    width, height = max_size(budget, aspect=aspect, quantity=quantity)
    assert height % 8 == 0 and width % 8 == 0
    assert width == width_for(height, aspect) == (height * aspect[0] // aspect[1]) // 8 * 8
    assert fits(height, width)                                      # it fits
    assert not fits(height + 8, width_for(height + 8, aspect))     # the next step does not


def test_max_size_is_monotonic_in_the_budget():
    sizes = [max_size(gib * 2**30, aspect=(3, 2)) for gib in (4, 6, 8, 12, 16, 24, 40, 80)]
    heights = [h for _, h in sizes]
    assert heights == sorted(heights) and heights[0] < heights[-1]


def test_max_size_options_matter():
    plain = max_size(8 * 2**30, aspect=(1, 1))
    four = max_size(8 * 2**30, aspect=(1, 1), num_images_per_prompt=4)
    assert four[1] < plain[1]


def test_max_size_budget_below_weights():
    with pytest.raises(InputError, match="weights and CUDA context alone"):
        max_size(2**30)


def test_smallest_height():
    assert smallest_height((1, 1)) == 8
    assert width_for(smallest_height((1, 100)), (1, 100)) == 8
    assert smallest_height((100, 1)) == 8


def test_max_size_cli(capsys):
    rc, out, err = call(capsys, "max-size", "--vram", "8GiB", "--aspect", "3:2")
    assert rc == 0, err
    w, h = max_size(8 * 2**30, aspect=(3, 2))
    assert out.splitlines()[0] == f"{w}x{h}"
    rc, out, err = call(capsys, "max-size", "--vram", "8 GiB", "--aspect", "3:2", "--quantity", "reserved", "--json")
    d = json.loads(out)
    assert (d["width"], d["height"]) == max_size(8 * 2**30, aspect=(3, 2), quantity="reserved")
    assert d["peak_bytes"] <= d["budget_bytes"] < d["next"]["peak_bytes"]


# ------------------------------------------------------------------------------------------
# simulate and compare (their modules are other helpers'; only the CLI's side is tested here)
# ------------------------------------------------------------------------------------------

def test_simulate_without_torch_is_one_line(capsys, monkeypatch):
    mod = types.ModuleType("sd_vram.simulation")

    def __getattr__(name):
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    mod.__getattr__ = __getattr__
    monkeypatch.setitem(sys.modules, "sd_vram.simulation", mod)
    rc, out, err = call(capsys, "simulate", "640x427")
    assert rc != 0 and "sd-vram[sim]" in err and len(err.strip().splitlines()) == 1


def test_simulate_uses_the_simulation(capsys, monkeypatch, tmp_path):
    calls = {}

    class FakeResult:
        def to_dict(self):
            return {"peak_allocated_bytes": 3 * 2**30, "peak_stage": "vae_decode"}

        def plot_timeline(self, path):
            calls["plot"] = path

    def simulate(height, width, **kw):
        calls.update(kw, height=height, width=width)
        return FakeResult()

    mod = types.ModuleType("sd_vram.simulation")
    mod.simulate = simulate
    monkeypatch.setitem(sys.modules, "sd_vram.simulation", mod)
    png = str(tmp_path / "t.png")
    rc, out, err = call(capsys, "simulate", "640x427", "--prompt-length", "12", "--steps", "5", "--json",
                        "--timeline", png)
    assert rc == 0, err
    assert json.loads(out)["peak_stage"] == "vae_decode"
    assert calls == {"height": 427, "width": 640, "prompt_length": 12, "num_inference_steps": 5, "plot": png}
    rc, out, err = call(capsys, "simulate", "640x427")
    assert rc == 0 and "3.00 GiB" in out


def test_compare_missing_module_or_path_is_one_line(capsys, monkeypatch, tmp_path):
    rc, out, err = call(capsys, "compare", str(tmp_path / "nothing-here"))
    assert rc != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ------------------------------------------------------------------------------------------
# cold start
# ------------------------------------------------------------------------------------------

def test_cold_start_imports_no_torch_and_is_fast():
    code = (
        "import sys, time\n"
        "t0 = time.perf_counter()\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        + ("" if REAL else "import sd_vram.formula.equation as e, test_cli; e.estimate = test_cli.fake_estimate\n"
           "t0 = time.perf_counter()\n")
        + "from sd_vram.cli import main\n"
        "rc = main(['estimate', '640x427'])\n"
        "dt = time.perf_counter() - t0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers', 'PIL', 'numpy'))\n"
        "import json; print('RESULT' + json.dumps([rc, heavy, dt]), file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=str(REPO))
    line = [x for x in r.stderr.splitlines() if x.startswith("RESULT")][0]
    rc, heavy, dt = json.loads(line[len("RESULT"):])
    assert rc == 0
    assert heavy == [], f"estimate imported {heavy}"
    assert dt < 0.5, f"estimate took {dt:.3f} s"


@pytest.mark.skipif(REAL is False, reason="the console script runs the real equation")
def test_console_script():
    import shutil

    exe = shutil.which("sd-vram")
    if exe is None:
        pytest.skip("sd-vram console script not on PATH")
    r = subprocess.run([exe, "estimate", "640x427", "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["peak_stage"]


# ------------------------------------------------------------------------------------------
# what a new user tripped over (a trial of the CLI): each is one line, or said in the answer
# ------------------------------------------------------------------------------------------

def test_the_first_line_is_the_answer(capsys):
    rc, out, _ = call(capsys, "estimate", "640x427")
    est = equation.estimate(427, 640)
    first = out.splitlines()[0]
    assert rc == 0 and f"needs {fmt_bytes(est.peak_device)} of GPU memory" in first and est.peak_stage in first
    lo, hi = est.bounds["peak_device_bytes"]
    assert f"between {fmt_bytes(lo)} and {fmt_bytes(hi)}" in first          # the default profile: a range
    rc, out, _ = call(capsys, "estimate", "--pipeline", "txt2img", "--width", "1024", "--height", "1024")
    assert out.splitlines()[0].startswith("sd-vram estimate: txt2img at 1024x1024 needs ")
    rc, out, _ = call(capsys, "estimate", "640x427", "--pipeline", "inpaint", "--mask", "640x427")
    assert out.splitlines()[0].startswith("sd-vram estimate: inpaint of 640x427 at 512x512 needs ")


def test_options_errors_name_the_flags(capsys):
    for argv, flag in ((["512x512", "--pipeline", "txt2img", "--height", "500"], "--height must be a multiple of 8"),
                       (["512x512", "--lora-fused"], "--lora-fused needs a LoRA (--lora RANK"),
                       (["512x512", "--cudnn-benchmark", "--no-cudnn"], "with --no-cudnn"),
                       (["512x512", "--pipeline", "inpaint"], "(--mask FILE or WIDTHxHEIGHT)"),
                       (["512x512", "--expandable-segments", "--alloc-conf", "expandable_segments:False"],
                        "--expandable-segments conflicts with --alloc-conf 'expandable_segments:False'")):
        rc, _, err = call(capsys, "estimate", *argv)
        assert rc == 2 and flag in err and "Python" not in err, (argv, err)
    for argv, words in ((["512x512", "--strength", "2"], "error: --strength must be in [0, 1]"),
                        (["512x512", "--alloc-conf", "expandable_segments:maybe"],      # PyTorch's own words
                         "True/False argument for expandable_segments"),
                        (["512x512", "--gpu-profile", "/nowhere/channels_last.json"], "/nowhere/channels_last.json"),
                        (["512x512", "--pipeline", "inpaint", "--mask", "/nowhere/m.png"],
                         "argument --mask: /nowhere/m.png: no such mask file")):
        rc, _, err = call(capsys, "estimate", *argv)
        assert rc == 2 and words in err, (argv, err)


def test_an_alloc_conf_that_enables_expandable_segments_says_so(capsys):
    rc, out, _ = call(capsys, "estimate", "512x512", "--json", "--alloc-conf",
                      "expandable_segments:False,expandable_segments:True")
    d = json.loads(out)
    assert d["options"]["expandable_segments"] is True            # the last value wins, as in PyTorch
    assert d["peak_reserved_bytes"] == equation.estimate(512, 512, expandable_segments=True).peak_reserved
    rc, out, _ = call(capsys, "estimate", "512x512", "--expandable-segments", "--alloc-conf", "max_split_size_mb:512")
    assert "PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:512,expandable_segments:True" in out


def test_the_shells_alloc_conf_applies_unless_a_flag_gives_one(capsys, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    rc, out, err = call(capsys, "estimate", "2048x2048", "--json")
    assert rc == 0 and "from the environment applies" in err and len(err.strip().splitlines()) == 1
    assert json.loads(out)["peak_reserved_bytes"] == equation.estimate(2048, 2048, expandable_segments=True).peak_reserved
    rc, out, err = call(capsys, "estimate", "2048x2048", "--json", "--alloc-conf", "max_split_size_mb:512")
    assert err == "" and json.loads(out)["options"]["alloc_conf"] == "max_split_size_mb:512"
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "frobnicate:1")        # read before the CUDA name, as c10 does
    rc, _, err = call(capsys, "estimate", "512x512")
    assert rc == 2 and err.strip() == ("sd-vram: error: PYTORCH_ALLOC_CONF=frobnicate:1 in the environment: "
                                       "Unrecognized CachingAllocator option: frobnicate")
    rc, _, err = call(capsys, "estimate", "512x512", "--alloc-conf", "")        # PyTorch's defaults instead
    assert rc == 0 and err == ""


def test_derived_settings_are_named_in_the_answer(capsys):
    rc, out, _ = call(capsys, "estimate", "512x512", "--dtype", "fp32", "--scheduler", "ddim")
    assert "not yet measured on a GPU: dtype fp32, scheduler ddim" in out
    rc, out, _ = call(capsys, "estimate", "512x512", "--json", "--expandable-segments")
    assert "derived_not_measured" not in json.loads(out)            # measured on the H200


def test_a_verdict_resting_on_unmeasured_terms_says_so(capsys):
    """1640x1096 on an 8 GiB budget (the default profile): the point fits, with the cache released;
    the heaviest workspaces on record would need cuDNN's fallbacks (equation.verdict_range)."""
    ends = equation.verdict_range(1096, 1640, vram=8 << 30)
    assert ends == ("fits", "fits-with-fallback")
    rc, out, _ = call(capsys, "estimate", "1640x1096", "--vram", "8GiB")
    assert rc == 0 and out.startswith("fits: ")
    assert out.splitlines()[1].startswith("  not certain: from fits to fits only with cuDNN fallbacks")
    rc, out, _ = call(capsys, "estimate", "1640x1096", "--vram", "8GiB", "--json")
    assert json.loads(out)["boundary"]["verdict_range"] == ["fits", "fits-with-fallback"]
    rc, out, _ = call(capsys, "estimate", "1640x1096", "--vram", "16GiB")
    assert out.startswith("fits: ") and "not certain" not in out
    assert equation.verdict_range(1096, 1640, vram=16 << 30) == ("fits", "fits")


def test_max_size_leaves_the_size_to_its_search(capsys):
    for argv, flag in ((["--pipeline", "txt2img", "--height", "768"], "--height"),
                       (["--pipeline", "inpaint", "--mask", "512x512"], "--mask")):
        rc, _, err = call(capsys, "max-size", "--vram", "8GiB", *argv)
        assert rc == 2 and f"max-size searches the size itself: leave out {flag}" in err, err
    rc, out, _ = call(capsys, "max-size", "--vram", "8GiB", "--pipeline", "txt2img")
    assert rc == 0 and "txt2img call" in out and "under this budget" in out
    assert out.splitlines()[-1] == "derived from the sources, not yet measured on a GPU: txt2img"
    rc, out, _ = call(capsys, "max-size", "--vram", "1GiB", "--quantity", "allocated")
    assert rc == 1 and "the weights alone need" in out                  # no CUDA context in torch's counters


def test_max_size_says_when_its_answer_rests_on_unmeasured_terms(capsys):
    rc, out, _ = call(capsys, "max-size", "--vram", "8GiB", "--aspect", "3:2")
    width, height = map(int, out.splitlines()[0].split("x"))
    ends = equation.verdict_range(height, width, vram=8 << 30)
    assert ends[0] != ends[1] and f"not certain for {width}x{height}: from fits to" in out
    rc, out, _ = call(capsys, "max-size", "--vram", "8GiB", "--aspect", "3:2", "--json")
    assert json.loads(out)["verdict_range"] == list(ends) and json.loads(out)["derived_not_measured"] == []


def test_slice_sizes_and_budgets(capsys):
    rc, _, err = call(capsys, "estimate", "512x512", "--attention-slicing", "9")
    assert rc == 2 and "8 heads" in err
    rc, _, err = call(capsys, "max-size", "--vram=-8GiB")
    assert rc == 2 and "must be positive" in err


def test_cudnn_benchmark_range_tops_out_at_the_card(capsys):
    rc, out, _ = call(capsys, "estimate", "512x512", "--cudnn-benchmark")
    assert "and the card's memory (give --vram)" in out            # the default profile is no card
    est = equation.estimate(512, 512, cudnn_benchmark=True, vram=8 << 30)
    assert est.bounds["peak_device_bytes"][1] == 8 << 30


def test_compare_checks_the_plot_path_first(capsys, tmp_path):
    missing = tmp_path / "no-such-folder" / "x.png"
    rc, _, err = call(capsys, "compare", str(REPO / "results"), "--png", str(missing))
    assert rc == 2 and "no such folder" in err and not missing.parent.exists()
    rc, _, err = call(capsys, "compare", str(REPO / "results"), "--png", str(tmp_path))
    assert rc == 2 and "is a directory" in err
