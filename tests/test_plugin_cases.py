"""The case catalogue, input images, memory-history reduction and archive helpers of the plugin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sd_vram.formula.options import Options
from sd_vram.formula.tokenizer import count_tokens
from sd_vram.plugin import archive, checks, memhistory
from sd_vram.plugin.cases import Case, CatalogueError, load_catalogue, synthetic_image

ROOT = Path(__file__).resolve().parents[1]
CAT = load_catalogue(ROOT / "cases" / "catalogue.toml")

SEEDS = {  # the issue's images, their sizes (width x height, ../shared/seed-images/README.md) and prompts, verbatim
    "balloon": ("balloon--low-res.jpeg", 396, 380,
                "aerial view, colorful hot air balloon, lush green forest canopy, springtime, warm climate, vibrant "
                "foliage, soft sunlight, gentle shadow, white birds flying alongside, harmony, freedom, bright natural "
                "colors, serene atmosphere, highly detailed, realistic, photorealistic, cinematic lighting"),
    "bench": ("bench--high-res.jpg", 2048, 2048,
              "photorealistic, high resolution, realistic lighting, natural shadows, detailed textures, lush green "
              "grass, wooden bench with grain detail, expansive valley, agricultural fields, blue-toned mountains, "
              "fluffy cumulus clouds, wispy cirrus clouds, bright blue sky, clear sunny day, soft sunlight, tranquil "
              "atmosphere, cinematic realism"),
    "groceries": ("groceries--low-res.jpg", 800, 534,
                  "cartoon style, bold outlines, simplified shapes, vibrant colors, playful atmosphere, exaggerated "
                  "proportions, stylized SUV trunk, whimsical paper grocery bags, fresh produce with bright highlights, "
                  "baguette with cartoon detail, cheerful parking area, greenery with simplified textures, sunny day, "
                  "lighthearted mood, 2D illustration, animated landscape aesthetic"),
    "truck": ("truck--high-res.jpg", 1800, 1200,
              "Michelangelo style, Renaissance painting, classical composition, rich earthy tones, detailed brushwork, "
              "divine atmosphere, expressive lighting, monumental presence, artistic grandeur, fresco-inspired "
              "texture, high contrast shadows, timeless aesthetic"),
}


def test_seed_cases_verbatim():
    seeds = [c for c in CAT.cases if "seed" in c.tags]
    assert len(seeds) == 4
    for c in seeds:
        image, w, h, prompt = SEEDS[c.name.split("-")[0]]
        assert (c.image, c.width, c.height, c.prompt) == (image, w, h, prompt)
        assert c.name == f"{c.name.split('-')[0]}-{w}x{h}"
        # The issue's call: guidance_scale 5.0, no negative prompt, output as PIL through the safety checker.
        assert c.options["guidance_scale"] == 5.0 and c.options["output_type"] == "pil" and c.options["safety_checker"]


def test_seed_images_are_the_provided_files():
    """cases/images/ holds the four files; the catalogue's sizes are theirs (EXIF applied)."""
    from PIL import Image

    for c in (c for c in CAT.cases if "seed" in c.tags):
        path = c.image_path(CAT.images_dir)
        assert path is not None, f"{c.image} missing from cases/images/"
        with Image.open(path) as im:
            assert im.getexif().get(0x0112, 1) == 1 and im.mode == "RGB"
        assert c.size(CAT.images_dir) == (c.height, c.width)


def test_stand_in_sizes_stay_as_synthetic_cases():
    """The sizes first guessed for the seeds: archived runs measured them under these names."""
    for name in ("balloon-640x427", "groceries-800x533", "bench-3840x2560", "truck-4032x3024"):
        c = CAT.get(name)
        assert c.image is None and "seed" not in c.tags and "stand-in" in c.tags


def test_every_case_is_valid_and_named_by_its_size():
    names = [c.name for c in CAT.cases]
    assert len(names) == len(set(names))
    for c in CAT.cases:
        assert c.name.endswith(f"-{c.width}x{c.height}"), c.name
        Options(**c.options)
        assert set(c.options) == set(Options.__dataclass_fields__) - {"gpu"}


def _with(**want):
    return [c for c in CAT.cases if all(c.options[k] == v for k, v in want.items())]


def test_catalogue_covers_the_issue():
    squares = {c.width for c in CAT.cases if "square" in c.tags and c.width == c.height}
    assert squares == {64, 128, 256, 512, 768, 1024, 1536, 2048}
    assert any(c.width % 8 and c.height % 8 for c in CAT.cases)
    assert any(c.width > c.height and "aspect" in c.tags for c in CAT.cases)
    assert any(c.width < c.height and "aspect" in c.tags for c in CAT.cases)
    lengths = [count_tokens(c.prompt) for c in CAT.cases]
    assert 0 in lengths and any(0 < n < 10 for n in lengths) and any(n > 77 for n in lengths)
    assert _with(guidance_scale=1.0) and _with(num_images_per_prompt=2)
    assert _with(attention="efficient") and _with(vae_tiling=True) and _with(vae_slicing=True)
    assert _with(safety_checker=False) and _with(output_type="latent") and _with(attention_slicing="auto")
    maths = _with(attention="math")
    assert any(c.width <= 256 and c.height <= 256 for c in maths)
    # math materializes N x N scores: only small sizes, except the case meant to run out of memory
    assert all(c.width <= 256 and c.height <= 256 for c in maths if "oom" not in c.tags)
    assert any("oom" in c.tags for c in maths)


def test_short_runs_reach_pndm_steady_state():
    # PNDM holds 4 past noise predictions from the 5th UNet evaluation on; the suite runs 5.
    assert {c.unet_evals for c in CAT.cases if c.opts.scheduler == "pndm"} == {5}
    full = CAT.get("balloon-396x380").full_call()
    assert full.unet_evals == 41 and full.id == "balloon-396x380/full-call"   # diffusers: 40 steps + 1
    assert (full.options["num_inference_steps"], full.options["strength"]) == (50, 0.8)


def test_scheduler_cases_reach_their_steady_state():
    """Two schedulers besides PNDM on the four seed images and two other sizes, each run past
    the evaluation from which its state stops changing."""
    from sd_vram.formula.schedulers import steady_state_evals

    cases = CAT.select(None, "scheduler")
    names = {c.opts.scheduler for c in cases}
    assert len(names) == 2 and "pndm" not in names
    seeds = {(c.image, c.width, c.height, c.prompt) for c in CAT.cases if "seed" in c.tags}
    for name in names:
        mine = [c for c in cases if c.opts.scheduler == name]
        assert {(c.image, c.width, c.height, c.prompt) for c in mine if c.image} == seeds
        assert len([c for c in mine if not c.image]) == 2
        assert all(c.unet_evals >= steady_state_evals(name) for c in mine)


def test_selection():
    assert [c.name for c in CAT.select("balloon-*")] == ["balloon-396x380", "balloon-640x427"]
    assert {c.name for c in CAT.select(None, "seed")} == {c.name for c in CAT.cases if "seed" in c.tags}
    assert [c.name for c in CAT.select("square-6*,odd-5*")] == ["square-64x64", "odd-517x389"]
    assert CAT.select("nothing-*") == []


@pytest.mark.parametrize("body, message", [
    ('[[case]]\nname = "a-8x8"\nwidth = 8\nheight = 8\noptions = { colour = 1 }', "unknown options ['colour']"),
    ('[[case]]\nname = "a-8x8"\nwidth = 8\nheight = 8\n[[case]]\nname = "a-8x8"\nwidth = 8\nheight = 8', "duplicate name"),
    ('[[case]]\nname = "a-8x8"\nwidth = 8\nheight = 8\noptions = { attention = "fast" }', "attention must be one of"),
    ('[[case]]\nname = "a-8x8"\nwidth = 4\nheight = 8', "width and height must be integers >= 8"),
    ('[[case]]\nname = "a-8x8"\nwidth = 8\nheight = 8\noptions = { strength = 0.5, num_inference_steps = 1 }',
     "leaves no denoising step"),
])
def test_bad_catalogue(tmp_path, body, message):
    p = tmp_path / "c.toml"
    p.write_text('schema = "sd-vram/cases/1"\n' + body)
    with pytest.raises(CatalogueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_catalogue(p)


def test_a_case_keeps_the_options_its_entry_sets(tmp_path):
    """The CLI runs a catalogue case with diffusers' defaults where the entry sets nothing, and
    with what it does set, even a value equal to the catalogue's [defaults]."""
    p = tmp_path / "catalogue.toml"
    p.write_text('schema = "sd-vram/cases/1"\n[defaults]\noptions = {num_inference_steps = 5}\n'
                 '[[case]]\nname = "a-64x64"\nwidth = 64\nheight = 64\n'
                 'options = {num_inference_steps = 5, vae_tiling = true}\n'
                 '[[case]]\nname = "b-64x64"\nwidth = 64\nheight = 64\n')
    a, b = load_catalogue(p).cases
    assert a.own_options == {"num_inference_steps": 5, "vae_tiling": True} and b.own_options == {}
    assert a.options["num_inference_steps"] == b.options["num_inference_steps"] == 5


def test_a_variant_copies_its_cases_with_its_settings(tmp_path):
    p = tmp_path / "catalogue.toml"
    p.write_text('schema = "sd-vram/cases/1"\n[defaults]\noptions = {num_inference_steps = 5}\n'
                 '[[case]]\nname = "a-64x64"\nwidth = 64\nheight = 64\nprompt = "a cat"\nimage = "a.png"\n'
                 'options = {guidance_scale = 1.0}\ntags = ["seed"]\n'
                 '[[case]]\nname = "b-96x64"\nwidth = 96\nheight = 64\n'
                 '[[variant]]\nname = "tiled"\nof = ["a-64x64", "b-96x64"]\noptions = {vae_tiling = true}\n'
                 'tags = ["settings"]\n')
    cat = load_catalogue(p)
    a, b = cat.get("tiled.a-64x64"), cat.get("tiled.b-96x64")
    assert (a.width, a.height, a.prompt, a.image, a.tags) == (64, 64, "a cat", "a.png", ("settings",))
    assert a.own_options == {"guidance_scale": 1.0, "vae_tiling": True} and b.own_options == {"vae_tiling": True}
    assert a.options["num_inference_steps"] == 5 and (b.width, b.height) == (96, 64)
    assert [c.name for c in cat.select(None, "seed")] == ["a-64x64"]     # the copy is no seed case


@pytest.mark.parametrize("variant, message", [
    ('name = "v"\nof = ["nope"]', "no case named 'nope'"),
    ('name = "v"\nof = []', "`of` must list the cases"),
    ('name = "v w"\nof = ["a-8x8"]', "name must be letters"),
    ('name = "v"\nof = ["a-8x8"]\ncolour = 1', "unknown keys ['colour']"),
    ('name = "v"\nof = ["a-8x8"]\noptions = { attention = "fast" }', "attention must be one of"),
])
def test_bad_variant(tmp_path, variant, message):
    p = tmp_path / "c.toml"
    p.write_text('schema = "sd-vram/cases/1"\n[[case]]\nname = "a-8x8"\nwidth = 8\nheight = 8\n[[variant]]\n' + variant)
    with pytest.raises(CatalogueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_catalogue(p)


def test_generated_image_is_deterministic_and_sized():
    a, b = synthetic_image(517, 389, "odd"), synthetic_image(517, 389, "odd")
    assert a.size == (517, 389) and a.mode == "RGB" and a.tobytes() == b.tobytes()
    assert synthetic_image(517, 389, "other").tobytes() != a.tobytes()


def test_real_image_wins_and_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    case = Case(name="photo-40x30", width=40, height=30, prompt="", image="photo.jpg")
    assert case.size(tmp_path) == (30, 40)                      # no file: the stand-in size
    img, info = case.load_image(tmp_path)
    assert img.size == (40, 30) and info["source"] == "generated"
    exif = Image.Exif()
    exif[0x0112] = 6                                            # rotate 90 degrees on display
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "photo.jpg", exif=exif)
    assert case.size(tmp_path) == (64, 48)                      # (height, width) after rotation
    img, info = case.load_image(tmp_path)
    assert img.size == (48, 64) and img.mode == "RGB" and info == {"source": "file", "file": "photo.jpg"}
    from diffusers.utils import load_image

    assert load_image(str(tmp_path / "photo.jpg")).size == img.size


def test_memhistory_reduction_of_a_handmade_trace():
    MiB = 1 << 20
    s = memhistory.reduce_snapshot(memhistory.fake_snapshot(), resident_bytes=100 * MiB, measured_peak=124 * MiB)
    assert s["events"] == 8 and s["traced_peak_bytes"] == 24 * MiB and s["peak_allocated_bytes"] == 124 * MiB
    assert s["segments_peak_bytes"] == 64 * MiB
    at_peak = {(r["kind"], r["bytes"]) for r in s["at_peak"]}
    assert at_peak == {("raw", 16 * MiB), ("tensor", 8 * MiB)}  # the workspace and the conv output
    assert s["allocations_by_kind"] == {"tensor": {"count": 2, "bytes": 12 * MiB}, "raw": {"count": 1, "bytes": 16 * MiB}}
    assert [r["op"] for r in s["raw_allocations"]] == ["at::native::cudnn_convolution_forward workspace"]
    assert s["largest_at_peak"][0]["python_frame"] == "torch/nn/modules/conv.py:543:_conv_forward"
    json.dumps(s)


def test_memhistory_free_completed_after_free_requested_counts_once():
    t = [{"action": "alloc", "addr": 1, "size": 10, "frames": []},
         {"action": "free_requested", "addr": 1, "size": 10},
         {"action": "alloc", "addr": 2, "size": 5, "frames": []},
         {"action": "free_completed", "addr": 1, "size": 10},
         {"action": "alloc", "addr": 3, "size": 7, "frames": []}]
    s = memhistory.reduce_snapshot({"device_traces": [t]})
    assert s["traced_peak_bytes"] == 12 and s["peak_event"] == 4


def test_memhistory_frames_in_either_order():
    inner = [{"filename": "/x/torch/nn/modules/conv.py", "line": 1, "name": "_conv_forward"},
             {"filename": "/x/run.py", "line": 9, "name": "<module>"}]
    assert memhistory.frame_keys(inner)[0] == "conv.py:1:_conv_forward"
    assert memhistory.frame_keys(inner[::-1])[0] == "conv.py:1:_conv_forward"


@pytest.mark.parametrize("name, slug", [("NVIDIA H200", "H200"), ("NVIDIA H100 80GB HBM3", "H100-80GB-HBM3"),
                                        ("NVIDIA A100-SXM4-40GB", "A100-SXM4-40GB"), ("", "unknown")])
def test_gpu_slug(name, slug):
    assert archive.gpu_slug(name) == slug


def test_atomic_write_and_archive_discovery(tmp_path):
    p = tmp_path / "H200" / "20250101T000000Z_abc1234.json"
    archive.write_json_atomic(p, {"schema": archive.SCHEMA, "cases": []})
    archive.write_json_atomic(tmp_path / "H200" / "other.json", {"schema": "something else"})
    assert [q.name for q in p.parent.iterdir() if q.name.endswith(".tmp")] == []
    assert [q for q, _ in archive.load_all(tmp_path)] == [p]


@pytest.mark.parametrize("need, expect", [(90, "fit"), (96, "either"), (104, "either"), (106, "oom")])
def test_oom_expectation_uses_the_reserved_band(need, expect):
    assert checks.expectation({"peak_reserved_bytes": need}, 100, 0.05) == expect


@pytest.mark.parametrize("env, variant", [({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, "expandable_segments"),
                                          ({"PYTORCH_ALLOC_CONF": " expandable_segments : True"}, "expandable_segments"),
                                          ({"PYTORCH_ALLOC_CONF": "max_split_size_mb:64,expandable_segments:True"},
                                           "max_split_size_mb:64,expandable_segments:True"),
                                          ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}, "default"),
                                          ({"PYTORCH_CUDA_ALLOC_CONF": None}, "default"), ({}, "default")])
def test_allocator_variant(env, variant):
    assert checks.allocator_variant(env) == variant


def test_the_new_allocator_variable_wins_over_the_old_one():
    # c10/core/AllocatorConfig.cpp reads PYTORCH_ALLOC_CONF and falls back to PYTORCH_CUDA_ALLOC_CONF
    env = {"PYTORCH_ALLOC_CONF": "max_split_size_mb:512", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert checks.alloc_conf(env) == "max_split_size_mb:512"
    assert checks.alloc_conf({"PYTORCH_ALLOC_CONF": None, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}) \
        == "expandable_segments:True"


def test_prediction_follows_the_measuring_process_allocator():
    from sd_vram.formula import estimate

    native = checks.predict(1024, 1024, "a photo", {}, None)
    split = checks.predict(1024, 1024, "a photo", {}, None, "max_split_size_mb:512")
    assert split == estimate(1024, 1024, prompt="a photo", alloc_conf="max_split_size_mb:512").to_dict()
    assert split["options"]["alloc_conf"] == "max_split_size_mb:512" and native["options"]["alloc_conf"] == ""
    assert split["peak_allocated_bytes"] == native["peak_allocated_bytes"]   # the settings move reserved only


def test_a_case_whose_allocator_settings_differ_from_the_run_is_refused(monkeypatch):
    from sd_vram.formula.options import Options
    from sd_vram.plugin import gpu

    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    gpu._check_process_allocator(Options(alloc_conf="max_split_size_mb: 512"))   # the same settings
    gpu._check_process_allocator(Options())                                     # the run's settings
    with pytest.raises(RuntimeError, match="needs PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True; the run has "
                                           "max_split_size_mb:512"):
        gpu._check_process_allocator(Options(expandable_segments=True))
