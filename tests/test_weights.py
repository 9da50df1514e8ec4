"""The closed-form weight enumeration against models built on the meta device from the same config."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from sd_vram import models  # noqa: E402
from sd_vram.formula import architecture as arch  # noqa: E402

BUILDERS = {
    "unet": models.build_unet,
    "vae": models.build_vae,
    "text_encoder": models.build_text_encoder,
    "safety_checker": models.build_safety_checker,
}

# Published parameter counts of stable-diffusion-v1-5 (DESIGN.md), independent of both sides.
PUBLISHED = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480, "safety_checker": 303_981_588}


@pytest.fixture(scope="module")
def meta_models():
    with torch.device("meta"):
        return {name: build() for name, build in BUILDERS.items()}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_tensors_match_model_in_allocation_order(meta_models, name):
    model = meta_models[name]
    # Module._apply (what .to("cuda") runs) visits children first, then own params, then buffers.
    seen = []

    def visit(m, prefix):
        for child_name, child in m.named_children():
            visit(child, f"{prefix}{child_name}.")
        seen.extend((f"{prefix}{n}", tuple(p.shape)) for n, p in m._parameters.items() if p is not None)
        seen.extend((f"{prefix}{n}", tuple(b.shape)) for n, b in m._buffers.items() if b is not None)

    visit(model, "")
    assert [(n, s) for n, s, _ in arch.MODELS[name]()] == seen


@pytest.mark.parametrize("name", list(BUILDERS))
def test_parameter_count_to_the_unit(meta_models, name):
    counted = sum(p.numel() for p in meta_models[name].parameters())
    assert arch.numel(arch.MODELS[name]()) == counted == PUBLISHED[name]


def test_vae_split_between_encode_and_decode():
    assert arch.numel(arch.vae_encoder_tensors()) == 34_163_664
    assert arch.numel(arch.vae_decoder_tensors()) == 49_490_199
