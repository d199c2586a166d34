"""The type of a loaded Diffusers pipeline, as this package sees it."""

from typing import Any, TypeAlias

# Diffusers pipelines register their components at run time (pipe.unet, pipe.vae...) and are
# called with per-class keyword sets, none of which a type checker can see on
# DiffusionPipeline; the engine checks what it needs where it loads a pipeline instead.
Pipeline: TypeAlias = Any
