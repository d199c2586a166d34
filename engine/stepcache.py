"""Fast mode: DeepCache-style step caching for a UNet2DConditionModel (sd15 and sdxl families).

Between neighbouring denoising steps the UNet's deep features barely change (Ma et al.,
"DeepCache", 2023). On a full step the whole UNet runs and the output of the second-to-last up
block is kept; on the next ``interval - 1`` steps only the shallow branch runs (``conv_in``, the
first down block, the last up block) and the kept features stand in for everything deeper. The
deep blocks are switched off by wrapping their ``forward``; Diffusers' own ``UNet2DConditionModel
.forward`` is untouched. Opt-in per model (``fast = true`` in the registry): images change a little.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_INTERVAL = 3


@dataclass
class StepCache:
    """The switch and the kept features of one UNet. ``reset()`` before each pipeline call."""

    interval: int = DEFAULT_INTERVAL
    step: int = 0
    skipping: bool = False
    key: tuple[object, ...] | None = None  # (shape, dtype, device) of the last full step's input
    kept: Any = None  # output of up_blocks[-2] on the last full step
    res_counts: dict[int, int] = field(default_factory=dict)  # residuals each down block returns
    full_steps: int = 0
    cached_steps: int = 0

    def reset(self) -> None:
        self.step, self.skipping, self.key, self.kept = 0, False, None, None

    def begin_step(self, sample: Any) -> None:
        """Decide whether this UNet call runs in full (first step, every ``interval``-th step,
        or the input changed shape) or reuses the kept deep features."""
        key = (tuple(sample.shape), sample.dtype, sample.device)
        full = (
            self.step % self.interval == 0
            or self.kept is None
            or key != self.key
            or len(self.res_counts) == 0
        )
        if full:
            self.step = 0
            self.key = key
        self.skipping = not full
        self.step += 1
        if full:
            self.full_steps += 1
        else:
            self.cached_steps += 1


def install_step_cache(unet: Any, interval: int = DEFAULT_INTERVAL) -> StepCache | None:
    """Wrap ``unet``'s deep blocks so they can be skipped; return the cache (kept on the UNet as
    ``unet._atelier_step_cache``), or None when the UNet is too shallow to have a deep part."""
    existing: StepCache | None = getattr(unet, "_atelier_step_cache", None)
    if existing is not None:
        existing.interval = interval
        return existing
    if interval < 2 or len(unet.down_blocks) < 2 or len(unet.up_blocks) < 2:
        return None
    cache = StepCache(interval=interval)

    def pre_hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = kwargs.get("sample", args[0] if args else None)
        if sample is not None:
            cache.begin_step(sample)

    unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    for index, block in enumerate(unet.down_blocks):
        if index > 0:
            block.forward = _down(block.forward, index, cache)
    if unet.mid_block is not None:
        unet.mid_block.forward = _passthrough(unet.mid_block.forward, cache)
    last_deep = len(unet.up_blocks) - 2
    for index, block in enumerate(unet.up_blocks[:-1]):
        block.forward = _up(block.forward, cache, keep=index == last_deep)
    unet._atelier_step_cache = cache
    return cache


def reset_step_cache(unet: Any) -> None:
    """Forget kept features (a new pipeline call starts from fresh noise)."""
    cache = getattr(unet, "_atelier_step_cache", None)
    if cache is not None:
        cache.reset()


def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _down(forward: Callable[..., Any], index: int, cache: StepCache) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        if cache.skipping:
            hidden = _hidden(args, kwargs)
            # The residuals feed only up blocks that are skipped too: their count matters (the
            # UNet slices them per up block), their values never reach the output.
            return hidden, (hidden,) * cache.res_counts[index]
        sample, residuals = forward(*args, **kwargs)
        cache.res_counts[index] = len(residuals)
        return sample, residuals

    return run


def _passthrough(forward: Callable[..., Any], cache: StepCache) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        if cache.skipping:
            return _hidden(args, kwargs)
        return forward(*args, **kwargs)

    return run


def _up(forward: Callable[..., Any], cache: StepCache, *, keep: bool) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        if cache.skipping:
            return cache.kept if keep else _hidden(args, kwargs)
        out = forward(*args, **kwargs)
        if keep:
            cache.kept = out
        return out

    return run
