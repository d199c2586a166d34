"""A1111 sampler names mapped to Diffusers schedulers, and a per-call pipeline view that carries
its own scheduler so the shared cached pipeline is never mutated."""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from core.request import SCHEDULERS, canonical_scheduler

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    from engine.pipelines import Pipeline as DiffusionPipeline

# A1111 name -> (Diffusers class, config overrides). "DPM++ 2M" is DPMSolverMultistep's default
# (dpmsolver++, second order); A1111's "Karras" variants only change the sigma spacing.
SCHEDULER_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
}
if set(SCHEDULER_CLASSES) != set(SCHEDULERS):  # a new name in core must get a mapping here
    raise RuntimeError("engine.schedulers and core.request.SCHEDULERS list different names")


def make_scheduler(name: str, base_config: Mapping[str, Any]) -> SchedulerMixin:
    """A fresh scheduler for A1111 sampler ``name`` built from a model's scheduler config."""
    import diffusers

    class_name, overrides = SCHEDULER_CLASSES[canonical_scheduler(name)]
    cls = getattr(diffusers, class_name)
    # The model's betas/prediction type/timestep spacing carry over; only the sampler changes.
    return cls.from_config(dict(base_config), **overrides)  # type: ignore[no-any-return]


class SchedulerCache:
    """One scheduler object per (model, sampler name).

    Schedulers keep per-run state (timesteps, step index, multistep history), so a cached one
    must serve one pipeline call at a time; the engine runs one batch at a time under its lock.
    """

    def __init__(self) -> None:
        self._schedulers: dict[tuple[str, str], SchedulerMixin] = {}
        self._lock = threading.Lock()

    def get(self, model: str, name: str, base_config: Mapping[str, Any]) -> SchedulerMixin:
        key = (model, canonical_scheduler(name))  # InvalidRequest names the valid ones
        with self._lock:
            scheduler = self._schedulers.get(key)
            if scheduler is None:
                scheduler = make_scheduler(key[1], base_config)
                self._schedulers[key] = scheduler
            return scheduler

    def __len__(self) -> int:
        return len(self._schedulers)


def with_scheduler(pipe: DiffusionPipeline, scheduler: SchedulerMixin) -> DiffusionPipeline:
    """A shallow view of ``pipe`` using ``scheduler``: same weights, own scheduler and run state.

    Only the view's attributes change (its scheduler, its config copy, ``_interrupt``...), so the
    cached pipeline and its img2img/inpaint siblings, which share one scheduler, stay untouched.
    A copy costs microseconds; constructing a pipeline would re-run its __init__ checks.
    """
    view = copy.copy(pipe)
    view.scheduler = scheduler  # DiffusionPipeline.__setattr__ updates the view's own config
    # Progress is reported through callbacks, never tqdm; a new dict, as the copy shares the old.
    view._progress_bar_config = {**getattr(pipe, "_progress_bar_config", {}), "disable": True}
    return view
