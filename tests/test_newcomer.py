"""What a new user of the command line hit first (issue 12): each defect, one test.

Every bad input ends in one line on stderr and exit 2; no figure of the equation is asserted.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import types
import zlib
from pathlib import Path

import pytest

from sd_vram.cli import main
from sd_vram.output import fmt_bytes
from sd_vram.formula import InputError, estimate, tokenizer

pytestmark = pytest.mark.usefixtures("no_shell_alloc_conf")   # tests/conftest.py

REPO = Path(__file__).resolve().parents[1]


def call(capsys, *args):
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, status=2):
    lines = err.strip().splitlines()
    return rc == status and len(lines) == 1 and lines[0].startswith("sd-vram: error: ") and "Traceback" not in err


# --- values that start with '-' -------------------------------------------------------------

def test_prompt_that_starts_with_a_minus(capsys):
    rc, out, err = call(capsys, "estimate", "64x64", "--prompt", "-5 apples", "--json")
    assert rc == 0, err
    assert json.loads(out)["prompt_tokens"] == tokenizer.count_tokens("-5 apples")


def test_negative_guidance_scale_is_cfg_off(capsys):
    rc, out, err = call(capsys, "estimate", "64x64", "--guidance-scale", "-1e3", "--json")
    assert rc == 0, err
    assert json.loads(out)["options"]["guidance_scale"] == -1000.0


def test_attached_values_keep_argparse_rules(capsys):
    rc, out, err = call(capsys, "estimate", "64x64", "--guid", "-2", "--json")      # an abbreviation
    assert rc == 0 and json.loads(out)["options"]["guidance_scale"] == -2.0, err
    rc, _, err = call(capsys, "estimate", "64x64", "--prompt", "--json")            # an option is no value
    assert one_line_error(rc, err) and "expected one argument" in err


def test_negative_strength_is_out_of_range_not_a_negative_size(capsys):
    rc, _, err = call(capsys, "estimate", "64x64", "--strength", "-1e-3")
    assert one_line_error(rc, err) and "strength must be in [0, 1]" in err


# --- numbers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [("--guidance-scale", "nan"), ("--guidance-scale", "inf"),
                                         ("--guidance-scale", "-inf"), ("--strength", "nan")])
def test_non_finite_numbers_are_refused(capsys, flag, value):
    rc, out, err = call(capsys, "estimate", "64x64", flag, value, "--json")
    assert one_line_error(rc, err) and out == ""


def test_non_finite_numbers_in_the_api():
    for bad in (float("nan"), float("inf")):
        with pytest.raises(InputError):
            estimate(64, 64, guidance_scale=bad)


@pytest.mark.parametrize("option, value", [("vae_tiling", "no"), ("safety_checker", "False"), ("vae_slicing", 1),
                                           ("expandable_segments", "yes"), ("gpu", 5), ("vae_tiling", None)])
def test_api_type_checks_every_option(option, value):
    with pytest.raises(InputError, match=option):
        estimate(64, 64, **{option: value})


def test_5000_digit_size(capsys):
    rc, _, err = call(capsys, "estimate", "5" * 5000 + "x64")
    assert one_line_error(rc, err) and "digits" in err


def test_huge_sizes_in_tib(capsys):
    assert fmt_bytes(3 * 2**40) == "3.00 TiB"
    rc, out, err = call(capsys, "estimate", "999999999x999999999")
    assert rc == 0, err
    assert "TiB" in out


# --- files and text ---------------------------------------------------------------------------

def _png_header(path: Path, width: int, height: int) -> Path:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # an IDAT chunk with a valid CRC: Image.verify (the completeness check) reads chunks, not pixels
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [100_000, 0x7FFFFFFF])
def test_huge_png_header(capsys, tmp_path, side):
    rc, _, err = call(capsys, "estimate", str(_png_header(tmp_path / "huge.png", side, side)))
    assert one_line_error(rc, err) and "PIL refuses" in err


def test_a_truncated_image_is_refused_as_load_image_would(capsys, tmp_path):
    """Only the header gives the size, but diffusers.utils.load_image decodes the whole file: a
    cut-short JPEG or PNG is one line, not an estimate for a call that would fail."""
    from PIL import Image

    for name in ("photo.jpg", "photo.png"):
        whole = tmp_path / name
        Image.effect_noise((640, 480), 64).convert("RGB").save(whole)
        cut = tmp_path / f"cut-{name}"
        cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
        assert call(capsys, "estimate", str(whole))[0] == 0
        rc, _, err = call(capsys, "estimate", str(cut))
        assert one_line_error(rc, err) and "damaged or cut short" in err, err


def test_large_png_header_answers_without_a_pil_warning(tmp_path):
    """Between PIL's warning and error limits the header is read quietly: the size is all it needs."""
    png = _png_header(tmp_path / "large.png", 10_000, 10_000)
    r = subprocess.run([sys.executable, "-m", "sd_vram.cli", "estimate", str(png), "--json"], capture_output=True,
                       text=True, timeout=60, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and json.loads(r.stdout)["width"] == 10_000


def test_named_pipe_is_refused_not_read(tmp_path):
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    r = subprocess.run([sys.executable, "-m", "sd_vram.cli", "estimate", str(fifo)], capture_output=True,
                       text=True, timeout=30, cwd=str(tmp_path))
    assert r.returncode == 2 and "not a regular file" in r.stderr, r.stderr


def test_non_utf8_prompt(capsys):
    prompt = os.fsdecode(b"caf\xe9 \xff")   # what argv holds for bytes that are not UTF-8
    rc, _, err = call(capsys, "estimate", "64x64", "--prompt", prompt)
    assert one_line_error(rc, err) and "UTF-8" in err
    with pytest.raises(InputError, match="UTF-8"):
        estimate(64, 64, prompt=prompt)


def test_non_utf8_prompt_in_a_subprocess(tmp_path):
    r = subprocess.run([os.fsencode(sys.executable), b"-m", b"sd_vram.cli", b"estimate", b"64x64", b"--prompt",
                        b"caf\xe9"], capture_output=True, timeout=60, cwd=str(tmp_path))
    assert r.returncode == 2 and b"UTF-8" in r.stderr and b"Traceback" not in r.stderr


# --- output -----------------------------------------------------------------------------------

def test_one_step_and_the_labelled_stage_table(capsys):
    rc, out, err = call(capsys, "estimate", "64x64", "--steps", "1", "--strength", "1")
    assert rc == 0, err
    assert "1 step," in out and "1 steps" not in out
    header = next(line for line in out.splitlines() if line.startswith("stage "))
    peak = next(line for line in out.splitlines() if line.endswith("<- peak"))
    assert len(header) >= len(peak), "the last column has a heading over it"


def test_help_lists_the_profile_names(capsys):
    from sd_vram.formula import gpu_profiles

    rc, out, _ = call(capsys, "estimate", "--help")
    assert rc == 0
    flat = " ".join(out.split())
    assert all(name in flat for name in gpu_profiles.profiles()) and "h200" in flat


# --- simulate ---------------------------------------------------------------------------------

@pytest.fixture
def fake_simulation(monkeypatch):
    calls = []

    class Result:
        def to_dict(self):
            return {"peak_allocated_bytes": 2**30}

        def plot_timeline(self, path):
            Path(path).write_bytes(b"png")

    mod = types.ModuleType("sd_vram.simulation")
    mod.simulate = lambda h, w, **kw: calls.append((h, w, kw)) or Result()
    monkeypatch.setitem(sys.modules, "sd_vram.simulation", mod)
    return calls


def test_bad_timeline_path_fails_before_the_simulation(capsys, fake_simulation, tmp_path):
    for bad in (str(tmp_path / "no-such-folder" / "t.png"), str(tmp_path), str(tmp_path / "t.nope")):
        rc, _, err = call(capsys, "simulate", "64x64", "--timeline", bad)
        assert one_line_error(rc, err), (bad, err)
    assert fake_simulation == []
    rc, out, err = call(capsys, "simulate", "64x64", "--timeline", str(tmp_path / "t.png"))
    assert rc == 0 and len(fake_simulation) == 1 and (tmp_path / "t.png").is_file()


def test_simulate_one_step_is_refused_up_front(capsys, fake_simulation):
    rc, _, err = call(capsys, "simulate", "64x64", "--steps", "1")
    assert one_line_error(rc, err) and "no denoising step" in err and fake_simulation == []


def test_simulate_without_the_sim_extra_says_how_to_install(capsys, monkeypatch):
    mod = types.ModuleType("sd_vram.simulation")

    def __getattr__(name):
        raise ModuleNotFoundError("No module named 'numpy'", name="numpy")

    mod.__getattr__ = __getattr__
    monkeypatch.setitem(sys.modules, "sd_vram.simulation", mod)
    rc, _, err = call(capsys, "simulate", "64x64")
    assert one_line_error(rc, err, status=1) and "pip install 'sd-vram[sim]'" in err and "numpy" in err


# --- install ----------------------------------------------------------------------------------

def test_case_names_work_after_a_non_editable_install(tmp_path):
    """The catalogue ships in the wheel (sd_vram.cases): `sd-vram estimate square-512x512` outside a checkout."""
    import shutil
    import zipfile

    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    for name in ("sd_vram", "formula", "plugin", "simulation"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (src / "cases").mkdir()
    shutil.copy2(REPO / "cases" / "catalogue.toml", src / "cases")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        assert "sd_vram/cases/catalogue.toml" in z.namelist()
        z.extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    boot = f"import sys; sys.path.insert(0, {str(site)!r}); from sd_vram.cli import main; sys.exit(main(sys.argv[1:]))"
    for name, size in (("square-512x512", (512, 512)), ("truck", (1800, 1200)), ("groceries-800x534", (800, 528))):
        r = subprocess.run([sys.executable, "-I", "-c", boot, "estimate", name, "--json"], capture_output=True,
                           text=True, timeout=60, cwd=str(work))
        assert r.returncode == 0, (name, r.stderr)
        d = json.loads(r.stdout)
        assert (d["width"], d["height"]) == size
        assert d["prompt_tokens"] is not None


# --- compare ----------------------------------------------------------------------------------

def test_compare_agrees_with_the_readme_validation_line(capsys):
    """`sd-vram compare results/H200` re-predicts with today's equation, as the README's line does."""
    from sd_vram.formula.report import validation_summary

    rc, out, err = call(capsys, "compare", str(REPO / "results" / "H200"))
    assert rc == 0, err
    assert out.rstrip().splitlines()[-1] == validation_summary(str(REPO / "results" / "H200"))
    rc, out, _ = call(capsys, "compare", str(REPO / "results"))
    readme = (REPO / "README.md").read_text()
    assert out.rstrip().splitlines()[-1] in readme


def _archive(tmp_path, **change):
    src = sorted((REPO / "results" / "H200").glob("*Z_nogit.json"))[-1]
    data = json.loads(src.read_text())
    case = data["cases"][0]
    for where, value in change.items():
        *path, key = where.split("__")
        node = data if path[:1] != ["case"] else case
        for k in path[1:] if path[:1] == ["case"] else path:
            node = node[k]
        if value is KeyError:
            del node[key]
        else:
            node[key] = value
    out = tmp_path / "run.json"
    out.write_text(json.dumps(data))
    return out


@pytest.mark.parametrize("change", [
    {"case__inputs": KeyError}, {"case__id": KeyError}, {"gpu": "H200"}, {"environment": [1]},
    {"case__measurement__peak_allocated_bytes": 0}, {"case__measurement__peak_device_bytes": "3 GiB"},
    {"case__inputs__width": "wide"}, {"case__prediction": 7}, {"cases": {}},
])
def test_broken_archives_are_one_line(capsys, tmp_path, change):
    path = _archive(tmp_path, **change)
    for as_recorded in ([], ["--as-recorded"]):
        rc, out, err = call(capsys, "compare", str(path), *as_recorded)
        assert one_line_error(rc, err) and str(path) in err, (change, err)


def test_not_json_is_one_line(capsys, tmp_path):
    (tmp_path / "run.json").write_text("{not json")
    rc, _, err = call(capsys, "compare", str(tmp_path))
    assert one_line_error(rc, err) and "not valid JSON" in err


def test_compare_png_without_matplotlib_keeps_the_table(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc, out, err = call(capsys, "compare", str(REPO / "results" / "H200"), "--png", str(tmp_path / "p.png"))
    assert rc == 1 and "largest |error|" in out and "matplotlib" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p.png").exists()


def test_compare_plot_has_both_panels_with_readable_log_ticks(tmp_path):
    pytest.importorskip("matplotlib")
    from sd_vram.plugin import compare

    assert compare._nice_ticks(2.5, 45) == [3, 5, 10, 20, 30]
    png = tmp_path / "p.png"
    compare.compare_runs([REPO / "results" / "H200", REPO / "results" / "H100-80GB-HBM3"], png=png)
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 1.8 * im.size[1]    # two panels side by side


def test_simulate_is_quiet_on_stderr(tmp_path):
    """No transformers or diffusers notices (torchvision fallback, fp32 modules, one image for two) in a normal run."""
    pytest.importorskip("diffusers")
    r = subprocess.run([sys.executable, "-m", "sd_vram.cli", "simulate", "64x64", "--steps", "2",
                        "--num-images-per-prompt", "2"], capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_estimate_of_a_seed_image_is_quiet(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sd_vram.cli", "estimate", str(REPO / "cases" / "images" /
                        "truck--high-res.jpg")], capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert r.returncode == 0 and r.stderr == "" and "1800x1200" in r.stdout, r.stderr
