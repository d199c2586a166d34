"""What hardware a worker has (``detect_devices``) and how to run Diffusers on it: a pure
``choose_profile`` decision with one reason per choice, and ``apply_profile`` to carry it out."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cluster.device_classes import DeviceKind, device_class_name, nominal_gb
from engine.controlnets import kept_for

if TYPE_CHECKING:
    import torch

    from engine.calibrate import Calibration, Measurement, Variant
    from engine.pipelines import Pipeline as DiffusionPipeline

Offload = Literal["none", "model", "sequential"]
DType = Literal["float32", "float16", "bfloat16"]

MP = 1024 * 1024  # one "megapixel" as batch sizes are counted here: one 1024x1024 image
SD_TILE = 512 * 512
# CPU flags for native bf16 math (x86 AVX512-BF16 / AMX, Arm's BF16 extension). Without them
# oneDNN emulates bf16 and gains nothing over fp32.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
CPU_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "bf16", "asimd")
QUANT_BACKENDS = ("torchao", "optimum.quanto")
XL_FAMILIES = ("sdxl", "sdxl-turbo")


@dataclass(frozen=True)
class DeviceInfo:
    """One device as detected (or described, in tests). Memory is in bytes."""

    kind: DeviceKind
    name: str
    index: int | None = None
    capability: tuple[int, int] | None = None  # CUDA compute capability / ROCm gfx as (maj, min)
    total_memory: int | None = None  # VRAM; for cpu and mps the host RAM
    bf16: bool = False  # the device computes bf16 natively (for cpu: same as cpu_bf16)
    cpu_bf16: bool = False  # the host CPU has native bf16 (flags above)
    cpu_flags: tuple[str, ...] = ()  # the CPU_ISA_FLAGS present
    mkldnn_bf16: bool | None = None  # torch's oneDNN says bf16 works (maybe emulated)
    cores: int = 1  # physical cores usable by this process
    logical_cpus: int = 1
    sdpa: bool = True  # torch.nn.functional.scaled_dot_product_attention exists
    quant_backends: tuple[str, ...] = ()  # importable of QUANT_BACKENDS

    @property
    def memory_gb(self) -> float | None:
        return None if self.total_memory is None else self.total_memory / 2**30


@dataclass(frozen=True)
class DeviceProfile:
    """How to run a pipeline on one device. ``reasons`` explains each choice in one line."""

    device: str
    device_name: str
    device_class: str  # Ray custom resource name, e.g. "cpu", "a100-80gb", "rtx4090-24gb"
    dtype: DType
    sdpa: bool
    channels_last: bool
    vae_slicing: bool
    vae_tiling: bool
    tile_above_pixels: int  # decode larger images tiled even when vae_tiling is off
    offload: Offload
    max_batch_pixels: int  # sum of width*height over the images of one batch
    threads: int | None  # torch intra-op threads (cpu); None leaves torch's default
    compile: bool
    quantize: str | None
    quantize_backend: str | None
    fast: bool
    vram_gb: int | None  # nominal size, as the card is sold
    reasons: list[str] = field(default_factory=list)
    compile_backend: str = "inductor"  # torch.compile's; tests use "eager" (no C++ build)
    controlnet_slots: int = 1  # ControlNets a worker keeps loaded (engine.controlnets.kept_for)
    lora_slots: int = 4  # LoRAs one model keeps loaded (engine.loras.AdapterCache, LRU)

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)  # type: ignore[no-any-return]

    def needs_vae_tiling(self, width: int, height: int) -> bool:
        """Whether to decode an image of this size tiled (large images on small cards)."""
        return self.vae_tiling or width * height > self.tile_above_pixels


# Detection ------------------------------------------------------------------------------------


def _cpuinfo() -> str | None:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None


def _cpu_facts() -> dict[str, Any]:
    text = _cpuinfo()
    flags: set[str] = set()
    name = ""
    cores: set[tuple[str, str]] = set()
    if text:
        physical = core = ""
        for line in text.splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key in ("flags", "Features"):
                flags.update(value.split())
            elif key == "model name" and not name:
                name = value
            elif key == "physical id":
                physical = value
            elif key == "core id":
                core = value
                cores.add((physical, core))
    logical = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = logical
    # Hyper-threads share a core's math units: one torch thread per physical core is fastest.
    physical_cores = len(cores) or logical
    return {
        "name": name or "CPU",
        "flags": tuple(f for f in CPU_ISA_FLAGS if f in flags),
        "flags_known": bool(flags),
        "cores": max(1, min(physical_cores, usable)),
        "logical": logical,
    }


def _mkldnn_bf16() -> bool | None:
    import torch

    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is None or not torch.backends.mkldnn.is_available():
        return None
    try:
        return bool(check())
    except RuntimeError:
        return None


def _host_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _quant_backends() -> tuple[str, ...]:
    found = []
    for mod in QUANT_BACKENDS:
        try:
            if importlib.util.find_spec(mod) is not None:
                found.append(mod)
        except (ImportError, ValueError):  # a missing parent package raises
            continue
    return tuple(found)


def detect_devices() -> list[DeviceInfo]:
    """Every accelerator torch can see, then the CPU (always last, always present)."""
    import torch

    cpu = _cpu_facts()
    mkldnn = _mkldnn_bf16()
    native = any(f in cpu["flags"] for f in CPU_BF16_FLAGS)
    # Without /proc/cpuinfo (not Linux) trust oneDNN's own answer.
    cpu_bf16 = native if cpu["flags_known"] else bool(mkldnn)
    common: dict[str, Any] = {
        "cpu_bf16": cpu_bf16,
        "cpu_flags": cpu["flags"],
        "mkldnn_bf16": mkldnn,
        "cores": cpu["cores"],
        "logical_cpus": cpu["logical"],
        "sdpa": hasattr(torch.nn.functional, "scaled_dot_product_attention"),
        "quant_backends": _quant_backends(),
    }
    found: list[DeviceInfo] = []
    if torch.cuda.is_available():
        rocm = torch.version.hip is not None
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            cap = (props.major, props.minor)
            found.append(
                DeviceInfo(
                    kind="rocm" if rocm else "cuda",
                    name=props.name,
                    index=i,
                    capability=cap,
                    total_memory=props.total_memory,
                    bf16=torch.cuda.is_bf16_supported() if rocm else cap >= (8, 0),
                    **common,
                )
            )
    if getattr(torch, "xpu", None) is not None and torch.xpu.is_available():
        for i in range(torch.xpu.device_count()):
            xprops = torch.xpu.get_device_properties(i)
            found.append(
                DeviceInfo(
                    kind="xpu",
                    name=xprops.name,
                    index=i,
                    total_memory=xprops.total_memory,
                    bf16=True,
                    **common,
                )
            )
    if torch.backends.mps.is_available():
        found.append(
            DeviceInfo(kind="mps", name="Apple GPU (MPS)", total_memory=_host_memory(), **common)
        )
    found.append(
        DeviceInfo(
            kind="cpu", name=cpu["name"], total_memory=_host_memory(), bf16=cpu_bf16, **common
        )
    )
    return found


def best_device(devices: list[DeviceInfo] | None = None) -> DeviceInfo:
    """The device a single worker should use: the first accelerator, else the CPU."""
    return (devices if devices is not None else detect_devices())[0]


# Decision -------------------------------------------------------------------------------------


def _offload_for(vram: int, xl: bool) -> tuple[Offload, str]:
    # SDXL in half precision: UNet 5.1 GB + text encoders 1.6 GB + activations; SD1.5: ~2.2 GB.
    seq_below, model_below = (6, 10) if xl else (4, 6)
    what = "SDXL-class" if xl else "SD1.5-class"
    if vram < seq_below:
        return "sequential", (
            f"offload sequential: {vram} GB < {seq_below} GB for a {what} model; weights stream "
            "in layer by layer (slow, but fits)"
        )
    if vram < model_below:
        return "model", (
            f"offload model: {vram} GB < {model_below} GB for a {what} model; one component "
            "on the GPU at a time"
        )
    return "none", f"offload none: {vram} GB holds a {what} model whole"


def _batch_pixels_for(vram: int) -> tuple[int, str]:
    for at_least, pixels, label in (
        (80, 16 * MP, "16 x 1024²"),
        (40, 8 * MP, "8 x 1024²"),
        (24, 4 * MP, "4 x 1024²"),
        (16, 2 * MP, "2 x 1024²"),
        (12, 1 * MP, "1 x 1024² (4 x 512²)"),
        (8, 2 * SD_TILE, "2 x 512²"),
    ):
        if vram >= at_least:
            return pixels, f"max batch {label} for {vram} GB"
    return SD_TILE, f"max batch 1 x 512² for {vram} GB"


# An SD1.5 LoRA of rank 32-128 is 40-150 MB in fp16, an SDXL one 100-450 MB: the larger, to
# budget for. More than 16 held LoRAs seldom saves a load (few people share a worker), and each
# held one adds a branch to every layer it touches, which every switch walks.
LORA_MB = {False: 150, True: 450}
LORA_SHARE = 0.1  # of the card's memory, for the LoRAs of the model it runs
MAX_LORA_SLOTS = 16


def _lora_slots_for(kind: str, gb: float, xl: bool, offload: Offload) -> tuple[int, str]:
    """How many LoRAs one model keeps loaded on this device, and why."""
    if kind in ("cpu", "mps"):
        return 4, (f"lora slots 4 per model: a {kind} worker serves few people at once, and "
                   "each held LoRA slows every switch")
    if offload == "sequential":
        return 2, "lora slots 2 per model: sequential offload streams every held LoRA per step"
    size = LORA_MB[xl]
    slots = max(2, min(MAX_LORA_SLOTS, int(gb * 1024 * LORA_SHARE // size)))
    return slots, (f"lora slots {slots} per model: {LORA_SHARE:.0%} of {gb:g} GB over "
                   f"{size} MB per {'SDXL' if xl else 'SD1.5'} LoRA (2 to {MAX_LORA_SLOTS})")


def choose_profile(
    info: DeviceInfo,
    model_family: str | None = None,
    *,
    compile: bool = False,
    quantize: str | None = None,
    fast: bool = False,
    calibration: Calibration | None = None,
) -> DeviceProfile:
    """Decide how to run on ``info`` (pure: same input, same profile; nothing is touched).

    ``model_family`` (sd15, sdxl, ...) sets the offload thresholds; None assumes SDXL, the
    larger. ``compile``/``quantize``/``fast`` are the model's opt-ins from the registry.
    With a ``calibration`` that measured this device class and family, the dtype, and the
    quantization and compile the model opted into, are the fastest measured combination.
    """
    family = (model_family or "sdxl").lower()
    xl = family in XL_FAMILIES
    reasons: list[str] = []
    vram = nominal_gb(info.total_memory) if info.total_memory and info.kind != "cpu" else None
    device_class = device_class_name(info.kind, info.name, vram)
    measured = calibration.find(device_class, family) if calibration is not None else None

    # dtype
    dtype: DType
    if info.kind == "cpu":
        if info.cpu_bf16:
            dtype = "bfloat16"
            has = ", ".join(f for f in info.cpu_flags if f in CPU_BF16_FLAGS) or "oneDNN bf16"
            reasons.append(f"dtype bfloat16: the CPU has {has} (measured 2.3x over fp32)")
        else:
            dtype = "float32"
            reasons.append("dtype float32: the CPU has no native bf16 (no avx512_bf16/amx_bf16)")
    elif info.kind == "mps":
        dtype = "float16"
        reasons.append("dtype float16: Apple GPUs run half precision natively")
    elif info.kind == "cuda":
        cap = info.capability or (0, 0)
        sm = f"sm{cap[0]}{cap[1]}"
        if cap >= (8, 0):
            dtype = "bfloat16"
            reasons.append(f"dtype bfloat16: {sm} has bf16 tensor cores, and no fp16 overflow")
        else:
            dtype = "float16"
            reasons.append(f"dtype float16: {sm} (< sm80) has no fast bf16")
    else:  # rocm, xpu
        dtype = "bfloat16" if info.bf16 else "float16"
        reasons.append(f"dtype {dtype}: {info.kind} device {'has' if info.bf16 else 'lacks'} bf16")

    sdpa = info.sdpa
    reasons.append(
        "sdpa on: torch's fused scaled-dot-product attention"
        if sdpa
        else "sdpa off: this torch has no scaled_dot_product_attention"
    )

    channels_last = info.kind == "cuda"
    reasons.append(
        "channels_last on: NHWC convolutions suit tensor cores"
        if channels_last
        else f"channels_last off: no gain on {info.kind} (measured nothing on CPU)"
    )

    # Memory-dependent choices
    offload: Offload = "none"
    if info.kind == "cpu":
        threads: int | None = info.cores
        vae_slicing, vae_tiling, tile_above = True, False, 2048 * 2048
        max_pixels = 4 * SD_TILE
        reasons.append("offload none: CPU offload needs an accelerator to offload from")
        reasons.append("vae slicing on: decodes a batch one image at a time (lower peak RAM)")
        reasons.append("max batch 4 x 512² on CPU: bigger batches only queue longer")
        reasons.append(f"threads {threads}: one per physical core (hyper-threads add nothing)")
    elif info.kind == "mps":
        threads = None
        mem = nominal_gb(info.total_memory) if info.total_memory else 16
        vae_slicing, vae_tiling, tile_above = True, mem <= 16, 1024 * 1024
        max_pixels = MP if mem >= 32 else 2 * SD_TILE
        reasons.append("offload none: unified memory, nothing to offload to")
        reasons.append(f"vae slicing on, tiling {'on' if vae_tiling else 'off'}: {mem} GB shared")
        reasons.append(f"max batch {max_pixels // SD_TILE} x 512² for {mem} GB unified memory")
    else:
        threads = None
        gb = vram or 0
        offload, why = _offload_for(gb, xl)
        reasons.append(why)
        vae_slicing = gb <= 12
        vae_tiling = gb <= 8 or offload == "sequential"
        tile_above = 1536 * 1536 if gb >= 24 else 1024 * 1024
        reasons.append(
            f"vae slicing {'on' if vae_slicing else 'off'}, tiling "
            f"{'on' if vae_tiling else f'above {tile_above} pixels'}: {gb} GB"
        )
        if offload == "sequential":
            max_pixels = SD_TILE
            reasons.append("max batch 1 x 512²: sequential offload")
        else:
            max_pixels, why = _batch_pixels_for(gb)
            reasons.append(why)

    # Per-model opt-ins, and with a calibration the fastest measured combination
    backend = info.quant_backends[0] if info.quant_backends else None
    can_compile = compile and offload != "sequential"
    winner = (
        measured.fastest(lambda v: _permitted(v, quantize, backend, can_compile))
        if measured is not None else None
    )
    if measured is not None and winner is not None:
        dtype = winner.dtype  # type: ignore[assignment]
        reasons[0] = _measured_dtype_reason(measured, winner)
    do_compile = False
    if compile:
        if offload == "sequential":
            reasons.append("compile skipped: does not combine with sequential offload")
        elif measured is not None and winner is not None:
            do_compile = winner.compile
            reasons.append(_measured_reason(measured, winner, "compile", winner.compile))
        elif info.kind in ("cpu", "mps"):
            reasons.append(
                f"compile skipped: not measured on {info.kind}; compile only where "
                "`atelier devices --measure` found it faster"
            )
        else:
            do_compile = True
            reasons.append("compile on (model opt-in): the first job pays the compile time")
    q: str | None = None
    if quantize == "fp8" and not has_fp8(info):
        reasons.append(
            f"quantize fp8 skipped: needs an NVIDIA GPU of sm89 or newer (Ada, Hopper); "
            f"this is {_describe(info)}"
        )
    elif quantize:
        if backend is None:
            reasons.append(
                f"quantize {quantize} skipped: neither torchao nor optimum-quanto is installed"
            )
        elif measured is not None and winner is not None:
            q = winner.quantize
            reasons.append(_measured_reason(measured, winner, "quantize", winner.quantize))
        else:
            q = quantize
            reasons.append(f"quantize {quantize} with {backend} (model opt-in, not measured)")
    if q is None:
        backend = None
    if fast:
        reasons.append(
            "fast mode on (model opt-in): deep UNet features reused for 2 of every 3 steps"
        )
    lora_slots, why = _lora_slots_for(info.kind, vram or 0, xl, offload)
    reasons.append(why)

    memory = vram if info.kind not in ("cpu", "mps") else info.memory_gb
    controlnet_slots, why = kept_for(info.kind, memory, xl=xl, half=dtype != "float32",
                                     offload=offload)
    reasons.append(why)

    # ROCm builds of torch address AMD GPUs as "cuda".
    device: str = "cuda" if info.kind == "rocm" else info.kind
    if info.index is not None and info.kind not in ("cpu", "mps"):
        device = f"{device}:{info.index}"
    return DeviceProfile(
        device=device,
        device_name=info.name,
        device_class=device_class,
        dtype=dtype,
        sdpa=sdpa,
        channels_last=channels_last,
        vae_slicing=vae_slicing,
        vae_tiling=vae_tiling,
        tile_above_pixels=tile_above,
        offload=offload,
        max_batch_pixels=max_pixels,
        threads=threads,
        compile=do_compile,
        quantize=q,
        quantize_backend=backend,
        fast=fast,
        vram_gb=vram,
        reasons=reasons,
        controlnet_slots=controlnet_slots,
        lora_slots=lora_slots,
    )


def has_fp8(info: DeviceInfo) -> bool:
    """Whether the device multiplies fp8 natively (CUDA compute capability 8.9 or newer)."""
    return info.kind == "cuda" and (info.capability or (0, 0)) >= (8, 9)


def _describe(info: DeviceInfo) -> str:
    if info.kind == "cuda" and info.capability is not None:
        return f"{info.name} (sm{info.capability[0]}{info.capability[1]})"
    return f"{info.kind} ({info.name})"


def _permitted(v: Variant, quantize: str | None, backend: str | None, compile: bool) -> bool:
    """Whether a measured variant is one the model's opt-ins and this install allow."""
    if v.quantize and not (quantize and backend == "torchao" and v.quantize.startswith(quantize)):
        return False
    return compile or not v.compile


def _figures(v: Variant) -> str:
    mem = f", peak {v.peak_mb:,.0f} MB" if v.peak_mb is not None else ""
    return f"{v.name} {v.seconds_per_step:.3f} s/step{mem}"


def _measured_dtype_reason(m: Measurement, winner: Variant) -> str:
    plain = [v for v in m.variants if v.ok and not v.quantize and not v.compile]
    others = "; ".join(_figures(v) for v in plain if v.dtype != winner.dtype)
    return (f"dtype {winner.dtype}: fastest measured ({_figures(winner)}"
            f"{'; vs ' + others if others else ''}; {m.shape})")


def _measured_reason(m: Measurement, winner: Variant, what: str, chosen: object) -> str:
    if what == "compile":
        rivals = [v for v in m.variants if v.ok and v.compile != winner.compile]
    else:
        rivals = [v for v in m.variants if v.ok and bool(v.quantize) != bool(winner.quantize)]
    best = min(rivals, key=lambda v: v.seconds_per_step or 0.0) if rivals else None
    vs = f" vs {_figures(best)}" if best is not None else ""
    failed = [v.name for v in m.variants if not v.ok and (v.compile if what == "compile"
                                                          else v.quantize)]
    fails = f"; failed here: {', '.join(failed)}" if failed else ""
    if chosen:
        label = f"quantize {chosen} with torchao" if what == "quantize" else "compile on"
        return f"{label}: measured fastest ({_figures(winner)}{vs}){fails}"
    return f"{what} off (model opt-in): measured slower ({_figures(winner)}{vs}){fails}"


def describe_profile(profile: DeviceProfile) -> str:
    """Human-readable profile for ``atelier devices``."""
    mem = f", {profile.vram_gb} GB" if profile.vram_gb else ""
    lines = [
        f"device       {profile.device} ({profile.device_name}{mem})",
        f"class        {profile.device_class}",
        f"dtype        {profile.dtype}",
        f"offload      {profile.offload}",
        f"max batch    {profile.max_batch_pixels:,} pixels "
        f"({profile.max_batch_pixels / SD_TILE:g} x 512²)",
        f"vae          slicing {'on' if profile.vae_slicing else 'off'}, "
        f"tiling {'on' if profile.vae_tiling else 'off'}",
        f"threads      {profile.threads if profile.threads else 'default'}",
        f"quantize     {profile.quantize or 'none'}, compile {'on' if profile.compile else 'off'}",
        f"controlnets  {profile.controlnet_slots} kept loaded",
        f"lora slots   {profile.lora_slots} per model",
        "why:",
        *(f"  - {r}" for r in profile.reasons),
    ]
    return "\n".join(lines)


# Applying -------------------------------------------------------------------------------------


def apply_profile(pipe: DiffusionPipeline, profile: DeviceProfile) -> DiffusionPipeline:
    """Put ``pipe`` on the profile's device in its dtype and switch on what it chose."""
    import torch

    if profile.threads:
        torch.set_num_threads(profile.threads)
    dtype = profile.torch_dtype
    if pipe.dtype != dtype:
        pipe.to(dtype=dtype)
    if profile.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=profile.device)
    elif profile.offload == "model":
        pipe.enable_model_cpu_offload(device=profile.device)
    else:
        pipe.to(profile.device)
    if not profile.sdpa:
        from diffusers.models.attention_processor import AttnProcessor

        pipe.unet.set_attn_processor(AttnProcessor())
    if profile.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if profile.vae_slicing:
        pipe.vae.enable_slicing()
    else:
        pipe.vae.disable_slicing()
    if profile.vae_tiling:
        pipe.vae.enable_tiling()
    else:
        pipe.vae.disable_tiling()
    if profile.quantize and profile.quantize_backend:
        _quantize(pipe, profile.quantize, profile.quantize_backend)
    if profile.fast:
        from engine.stepcache import install_step_cache

        install_step_cache(pipe.unet)  # shared by the from_pipe siblings, like the UNet
    if profile.compile:
        # In place, so the img2img/inpaint siblings made by from_pipe share the compiled UNet.
        pipe.unet.compile(backend=profile.compile_backend)
    return pipe


def _quantize(pipe: DiffusionPipeline, mode: str, backend: str) -> None:
    """int8 quantization of the UNet (where nearly all the weights are) and the text encoders:
    weights only ("int8"), or with dynamic int8 activations too ("int8-dynamic", torchao)."""
    parts = [getattr(pipe, name, None) for name in ("unet", "text_encoder", "text_encoder_2")]
    if backend == "torchao":
        from engine.calibrate import quantize_module

        for part in parts:
            if part is not None:
                quantize_module(part, mode)
    else:
        from optimum.quanto import freeze, qint8, quantize

        for part in parts:
            if part is not None:
                quantize(part, weights=qint8)
                freeze(part)
