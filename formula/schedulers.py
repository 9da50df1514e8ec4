"""The schedulers of `--scheduler NAME`: their timestep logic and what they keep on the device
between denoising steps (DERIVATION.md, "Schedulers"). Facts of diffusers 0.42.1's
schedulers/scheduling_*.py, written once here for the equation, the simulation and the GPU run.

A scheduler is built as users write it, `X.from_config(pipe.scheduler.config)` from the
SD1.5 PNDM config: keys the hub config leaves out (`_use_default_values`: timestep_spacing,
prediction_type) take X's own defaults, so DDIM keeps "leading" spacing and the others use
"linspace". What each keeps is counted in latent-sized tensors (n, 4, h, w), all fp16: the
step()s that upcast to fp32 (Euler, Euler ancestral, DPM-Solver: `sample.to(torch.float32)`)
cast the result back and keep nothing upcast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

DEFAULT = "pndm"


@dataclass(frozen=True)
class Scheduler:
    """One scheduler of the pipeline, as diffusers 0.42.1 runs it for SD1.5 img2img."""

    name: str                        # the option's value
    diffusers_class: str             # diffusers.<class>.from_config(pipe.scheduler.config)
    timesteps: Callable[[int], int]  # len(scheduler.timesteps) after set_timesteps(n)
    kept: Callable[[int], int]       # latent-sized tensors it holds after its k-th step() (k >= 1)
    kept_what: str                   # what those tensors are (the equation's term name)
    order: int = 1                   # scheduler.order: get_timesteps drops t_start * order timesteps
    # after step k, its history holds __call__'s own noise_pred (PNDM appends it to ets)
    holds_noise_pred: Callable[[int], bool] = lambda k: False
    max_steps: int | None = None     # set_timesteps refuses more steps (ValueError)

    def state_after(self, k: int) -> tuple[int, int]:
        """(tensors the scheduler keeps, 1 if __call__'s noise_pred is one more) after k steps.

        The pipeline's `noise_pred`, the last step's guided prediction, stays a local of
        __call__ until the next step rebinds it: through the next UNet evaluation and, after
        the loop, through the VAE decode."""
        if k <= 0:
            return 0, 0
        return self.kept(k), int(not self.holds_noise_pred(k))

    def steady_from(self) -> int:
        """The step from which state_after() no longer changes (no earlier step holds more)."""
        k = 0
        while any(self.state_after(j) != self.state_after(k) for j in range(k + 1, k + 8)):
            k += 1
        return k


def _pndm_kept(k: int) -> int:
    # step_plms (skip_prk_steps): step 1 appends its noise prediction to ets and keeps the
    # input sample as cur_sample; step 2 (counter 1) appends nothing and drops cur_sample;
    # from step 3 on ets = ets[-3:] + [model_output]: 4 entries from step 5.
    return {1: 2, 2: 1}.get(k, min(k - 1, 4))


def _pndm_holds_noise_pred(k: int) -> bool:
    return k != 2     # step 2 appends nothing: its noise_pred is only __call__'s


SCHEDULERS: dict[str, Scheduler] = {s.name: s for s in (
    # PNDM (skip_prk_steps): plms_timesteps repeats the second to last timestep (n + 1 for n >= 2)
    Scheduler("pndm", "PNDMScheduler", lambda n: n + 1 if n >= 2 else n, _pndm_kept,
              "scheduler history (ets, cur_sample)", holds_noise_pred=_pndm_holds_noise_pred),
    # DDIM: no history; set_timesteps raises for more steps than num_train_timesteps
    Scheduler("ddim", "DDIMScheduler", lambda n: n, lambda k: 0, "", max_steps=1000),
    # Euler: sigmas stay on the CPU ("to avoid too much CPU/GPU communication"); step() keeps nothing
    Scheduler("euler", "EulerDiscreteScheduler", lambda n: n, lambda k: 0, ""),
    # Euler ancestral: its randn_tensor noise lives only inside step()
    Scheduler("euler-a", "EulerAncestralDiscreteScheduler", lambda n: n, lambda k: 0, ""),
    # DPM-Solver++ 2M: model_outputs, a list of solver_order = 2 converted (x0) predictions
    Scheduler("dpm++2m", "DPMSolverMultistepScheduler", lambda n: n, lambda k: min(k, 2),
              "scheduler history (model_outputs)"),
    # LMS: derivatives, up to order = 4 (step()'s default) of them
    Scheduler("lms", "LMSDiscreteScheduler", lambda n: n, lambda k: min(k, 4), "scheduler history (derivatives)"),
    # UniPC (bh2, solver_order 2): model_outputs (2 converted predictions) and last_sample
    Scheduler("unipc", "UniPCMultistepScheduler", lambda n: n, lambda k: min(k, 2) + 1,
              "scheduler history (model_outputs, last_sample)"),
)}
NAMES = tuple(SCHEDULERS)


def get(name: str) -> Scheduler:
    return SCHEDULERS[name]


def unet_evaluations(num_inference_steps: int, strength: float, scheduler: str = DEFAULT) -> int:
    """UNet evaluations of one img2img call: the timesteps get_timesteps leaves.

    StableDiffusionImg2ImgPipeline.get_timesteps keeps init = min(int(n * strength), n) steps:
    it drops the first t_start = n - init steps, i.e. t_start * scheduler.order timesteps of
    the scheduler's own schedule (retrieve_timesteps: set_timesteps(n))."""
    s = SCHEDULERS[scheduler]
    n = num_inference_steps
    t_start = n - min(int(n * strength), n)
    return max(s.timesteps(n) - t_start * s.order, 0)


def history(scheduler: str, evaluations: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """state_after() during the UNet stage's fullest evaluation (an evaluation sees what the
    steps before it left) and after the loop (the VAE decode sees what the last step left)."""
    s = SCHEDULERS[scheduler]
    during = max((s.state_after(k) for k in range(evaluations)), key=sum, default=(0, 0))
    return during, s.state_after(evaluations)


def steady_state_evals(scheduler: str) -> int:
    """The fewest UNet evaluations whose peak every longer call shares: the evaluation after
    the state stops changing, and at least the second (from the second on, __call__ also
    holds the previous evaluation's UNet output and noise prediction during the UNet)."""
    return max(2, SCHEDULERS[scheduler].steady_from() + 1)
