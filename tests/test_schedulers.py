"""--scheduler (formula/schedulers.py) against diffusers 0.42.1's own scheduler objects, and the
equation against the simulation for each scheduler.

The counts are checked on the real classes built as users build them,
X.from_config(pipe.scheduler.config): the timesteps get_timesteps leaves, and after each real
step() the latent-sized tensors the scheduler object holds, their dtype, and whether one of
them is __call__'s own noise_pred.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from sd_vram.formula import estimate, schedulers  # noqa: E402
from sd_vram.formula.options import InputError, Options, unet_evaluations  # noqa: E402

STEPS, STRENGTHS = (1, 2, 3, 50), (0, 0.01, 0.5, 1)
LATENT = (1, 4, 8, 8)


def _scheduler(name: str):
    from sd_vram.models import build_scheduler, switch_scheduler
    from sd_vram.simulation.patches import _lms_coefficient

    s = switch_scheduler(build_scheduler(), name)
    if name == "lms":      # no scipy here: the simulation's exact quadrature of the same integral
        s.get_lms_coefficient = _lms_coefficient.__get__(s)
    return s


def _timesteps(s, steps: int, strength: float):
    from diffusers import StableDiffusionImg2ImgPipeline

    s.set_timesteps(steps, device="cpu")
    timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=s), steps, strength, "cpu")
    return timesteps


@pytest.mark.parametrize("name", schedulers.NAMES)
def test_unet_evaluations_follow_each_schedulers_timesteps(name):
    for steps in STEPS:
        for strength in STRENGTHS:
            real = len(_timesteps(_scheduler(name), steps, strength))
            assert unet_evaluations(steps, strength, name) == real, (steps, strength)


def _latent_tensors(obj, out=None):
    """Latent-shaped tensors reachable from a scheduler's attributes, by storage."""
    out = {} if out is None else out
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else [obj]
    for v in values:
        if isinstance(v, torch.Tensor) and tuple(v.shape) == LATENT:
            out[v.untyped_storage().data_ptr()] = v
        elif isinstance(v, (list, tuple, dict)):
            _latent_tensors(v, out)
    return out


@pytest.mark.parametrize("name", schedulers.NAMES)
def test_what_each_scheduler_keeps_between_steps(name):
    """The img2img loop's calls on CPU fp16 tensors: scale_model_input, step(); after step k
    the scheduler holds kept(k) latent tensors besides the new latents, all fp16 (no upcast
    tensor outlives step()), and __call__'s noise_pred among them exactly where the model says."""
    model = schedulers.get(name)
    s = _scheduler(name)
    timesteps = _timesteps(s, 8, 1.0)
    latents = torch.randn(LATENT, dtype=torch.float16)
    latents = s.add_noise(latents, torch.randn_like(latents), timesteps[:1])
    for k, t in enumerate(timesteps, start=1):
        s.scale_model_input(latents, t)
        noise_pred = torch.randn(LATENT, dtype=torch.float16)       # the guided prediction
        latents = s.step(noise_pred, t, latents, return_dict=False)[0]
        held = _latent_tensors(vars(s))
        held.pop(latents.untyped_storage().data_ptr(), None)
        kept, extra = model.state_after(k)
        assert len(held) == kept, k
        assert all(v.dtype == torch.float16 for v in held.values()), k
        assert (noise_pred.untyped_storage().data_ptr() not in held) == bool(extra), k


def test_steady_state_is_where_the_state_stops_changing():
    # PNDM's is the simulation's long-proven 6 (tests/test_simulation.py)
    assert schedulers.steady_state_evals("pndm") == 6
    for name in schedulers.NAMES:
        m, k = schedulers.get(name), schedulers.steady_state_evals(name)
        assert all(m.state_after(j) == m.state_after(k - 1) for j in range(k - 1, 60)), name
        assert all(sum(m.state_after(j)) <= sum(m.state_after(k - 1)) for j in range(k)), name


def test_bad_scheduler_names_every_scheduler_in_one_line():
    with pytest.raises(InputError) as e:
        Options(scheduler="k_euler")
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in schedulers.NAMES) and "k_euler" in msg


def test_refused_where_diffusers_refuses():
    with pytest.raises(ValueError):                         # DDIM's set_timesteps
        _scheduler("ddim").set_timesteps(1001, device="cpu")
    with pytest.raises(InputError, match="at most 1000"):
        Options(scheduler="ddim", num_inference_steps=1001)
    Options(scheduler="euler", num_inference_steps=1001)    # the others take it
    # int(n * strength) == 0: no timestep left (PNDM keeps one for n >= 2)
    with pytest.raises(InputError, match="leaves no denoising step.*1/50"):
        Options(scheduler="dpm++2m", strength=0.01)
    assert Options(strength=0.01).unet_evaluations == 1


def test_default_is_pndm_and_changes_nothing():
    assert Options().scheduler == "pndm"
    assert estimate(512, 512).peak_allocated == estimate(512, 512, scheduler="pndm").peak_allocated


def test_history_grows_the_peak_by_latent_tensors_only():
    """Schedulers change only latent-sized state: the same UNet working set, a few
    n x 4 x h x w fp16 tensors more or less at 64x64 (where the UNet is the peak)."""
    latent = 4 * 8 * 8 * 2
    base = estimate(64, 64, scheduler="euler")
    for name in schedulers.NAMES:
        e = estimate(64, 64, scheduler=name)
        more = e.peak_allocated - base.peak_allocated
        assert e.peak_stage == base.peak_stage == "unet"
        assert more % latent == 0 and 0 <= more <= 4 * latent, name


# --- the equation against the simulation, one small size per scheduler --------------------

_SIM = {}


def _simulated(name: str, steps="auto"):
    from sd_vram.simulation import simulate

    key = (name, steps)
    if key not in _SIM:
        _SIM[key] = simulate(64, 64, steps=steps, scheduler=name, gpu="h200", num_inference_steps=10)
    return _SIM[key]


@pytest.mark.parametrize("name", [n for n in schedulers.NAMES if n != "pndm"])   # pndm: test_equation_vs_simulation
def test_equation_matches_simulation_per_scheduler(name):
    r = _simulated(name)
    e = estimate(64, 64, scheduler=name, gpu="h200", num_inference_steps=10)
    assert r.unet_evals == min(schedulers.steady_state_evals(name),
                               Options(scheduler=name, num_inference_steps=10).unet_evaluations)
    assert e.peak_stage == r.peak_stage
    assert abs(e.peak_allocated / r.peak_allocated - 1) < 0.01
    assert abs(e.peak_reserved / r.peak_reserved - 1) < 0.03


@pytest.mark.parametrize("name", ["dpm++2m", "lms", "unipc"])   # the ones with a history
def test_steady_state_reaches_the_full_calls_peak(name):
    """steps="auto" stops at the scheduler's steady state; two more evaluations change no peak."""
    auto = _simulated(name)
    longer = _simulated(name, steps=schedulers.steady_state_evals(name) + 2)
    assert longer.unet_evals == auto.unet_evals + 2
    assert (longer.peak_allocated, longer.peak_reserved) == (auto.peak_allocated, auto.peak_reserved)
    for stage in auto.stages:
        assert longer.stages[stage].allocated == auto.stages[stage].allocated, stage
