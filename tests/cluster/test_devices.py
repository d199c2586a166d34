"""Device profiles decided for described hardware (no GPU needed), detection on this machine, and
applying a profile to a tiny pipeline."""

from __future__ import annotations

import pytest
import torch

from cluster.device_classes import device_class_name, nominal_gb
from engine.devices import (
    MP,
    SD_TILE,
    DeviceInfo,
    apply_profile,
    choose_profile,
    describe_profile,
    detect_devices,
)
from engine.tiny import build_tiny_pipeline


def cuda(name: str, capability: tuple[int, int], total_memory: int, **kw: object) -> DeviceInfo:
    # total_memory values are what torch reports for these cards.
    return DeviceInfo(
        kind="cuda", name=name, index=0, capability=capability, total_memory=total_memory,
        bf16=capability >= (8, 0), cores=16, logical_cpus=32, **kw,  # type: ignore[arg-type]
    )


RTX2070 = cuda("NVIDIA GeForce RTX 2070 SUPER", (7, 5), 8_361_017_344)  # 8 GB, 7.79 GiB
RTX4090 = cuda("NVIDIA GeForce RTX 4090", (8, 9), 25_393_692_672)  # 24 GB, 23.65 GiB
A100 = cuda("NVIDIA A100-SXM4-80GB", (8, 0), 85_051_572_224)  # 80 GB, 79.2 GiB
GTX1650 = cuda("NVIDIA GeForce GTX 1650", (7, 5), 4_100_000_000)  # 4 GB
T4 = cuda("Tesla T4", (7, 5), 15_642_329_088)  # 16 GB, 14.6 GiB
MPS = DeviceInfo(kind="mps", name="Apple GPU (MPS)", total_memory=16 * 2**30, cores=8)


def cpu(bf16: bool, cores: int = 2) -> DeviceInfo:
    return DeviceInfo(
        kind="cpu", name="AMD EPYC", total_memory=32 * 2**30, bf16=bf16, cpu_bf16=bf16,
        cpu_flags=("avx2", "avx512f", "avx512_bf16") if bf16 else ("avx2",),
        mkldnn_bf16=True, cores=cores, logical_cpus=2 * cores,
    )


@pytest.mark.parametrize(
    ("total", "nominal"),
    [(8_361_017_344, 8), (25_393_692_672, 24), (85_051_572_224, 80), (15_642_329_088, 16),
     (10_495_000_000, 10), (150_110_000_000, 141), (6_222_000_000, 6)],
)
def test_nominal_gb(total: int, nominal: int) -> None:
    assert nominal_gb(total) == nominal


@pytest.mark.parametrize(
    ("kind", "name", "gb", "expected"),
    [
        ("cuda", "NVIDIA A100-SXM4-80GB", 80, "a100-80gb"),
        ("cuda", "NVIDIA GeForce RTX 4090", 24, "rtx4090-24gb"),
        ("cuda", "NVIDIA H100 80GB HBM3", 80, "h100-80gb"),
        ("cuda", "Tesla T4", 16, "t4-16gb"),
        ("cuda", "NVIDIA RTX A6000", 48, "rtxa6000-48gb"),
        ("rocm", "AMD Instinct MI300X", 192, "mi300x-192gb"),
        ("cpu", "AMD EPYC", None, "cpu"),
        ("mps", "Apple GPU (MPS)", 16, "mps"),
    ],
)
def test_device_class_names(kind: str, name: str, gb: int | None, expected: str) -> None:
    assert device_class_name(kind, name, gb) == expected  # type: ignore[arg-type]


def test_8gb_pre_ampere_card() -> None:
    xl = choose_profile(RTX2070, "sdxl")
    assert (xl.device, xl.dtype, xl.device_class) == ("cuda:0", "float16", "rtx2070super-8gb")
    assert (xl.sdpa, xl.channels_last, xl.vae_slicing, xl.vae_tiling) == (True, True, True, True)
    assert xl.offload == "model"
    assert xl.max_batch_pixels == 2 * SD_TILE
    assert xl.threads is None
    sd = choose_profile(RTX2070, "sd15")
    assert sd.offload == "none"  # SD1.5 fits 8 GB whole
    assert any("sm75" in r for r in xl.reasons)


def test_24gb_card() -> None:
    p = choose_profile(RTX4090, "sdxl")
    assert (p.dtype, p.offload, p.device_class) == ("bfloat16", "none", "rtx4090-24gb")
    assert (p.vae_slicing, p.vae_tiling) == (False, False)
    assert p.max_batch_pixels == 4 * MP
    assert not p.needs_vae_tiling(1024, 1024) and p.needs_vae_tiling(2048, 2048)


def test_80gb_card() -> None:
    p = choose_profile(A100)
    assert (p.dtype, p.offload, p.device_class, p.vram_gb) == ("bfloat16", "none", "a100-80gb", 80)
    assert p.max_batch_pixels == 16 * MP


def test_small_cards_offload() -> None:
    assert choose_profile(GTX1650, "sdxl").offload == "sequential"
    assert choose_profile(GTX1650, "sdxl").max_batch_pixels == SD_TILE
    assert choose_profile(GTX1650, "sdxl").vae_tiling is True
    assert choose_profile(GTX1650, "sd15").offload == "model"
    assert choose_profile(GTX1650).offload == "sequential"  # no family: assume SDXL
    t4 = choose_profile(T4, "sdxl")
    assert (t4.dtype, t4.offload, t4.vae_slicing, t4.device_class) == (
        "float16", "none", False, "t4-16gb"
    )


def test_mps() -> None:
    p = choose_profile(MPS, "sd15")
    assert (p.device, p.dtype, p.offload, p.channels_last, p.device_class) == (
        "mps", "float16", "none", False, "mps"
    )


@pytest.mark.parametrize(("bf16", "dtype"), [(True, "bfloat16"), (False, "float32")])
def test_cpu(bf16: bool, dtype: str) -> None:
    p = choose_profile(cpu(bf16, cores=8), "sdxl")
    assert (p.device, p.dtype, p.device_class) == ("cpu", dtype, "cpu")
    assert p.offload == "none"  # offload needs an accelerator
    assert p.channels_last is False
    assert p.threads == 8
    assert p.max_batch_pixels == 4 * SD_TILE
    assert p.reasons[0].startswith(f"dtype {dtype}")


def test_opt_ins() -> None:
    on_cpu = choose_profile(cpu(True), "sd15", compile=True, quantize="int8", fast=True)
    assert on_cpu.compile is False
    assert on_cpu.quantize is None
    assert on_cpu.fast is True
    assert any(r.startswith("compile skipped") for r in on_cpu.reasons)
    assert any("neither torchao nor optimum-quanto" in r for r in on_cpu.reasons)

    gpu = cuda("NVIDIA GeForce RTX 4090", (8, 9), 25_393_692_672, quant_backends=("torchao",))
    p = choose_profile(gpu, "sdxl", compile=True, quantize="int8")
    assert (p.compile, p.quantize, p.quantize_backend) == (True, "int8", "torchao")
    assert choose_profile(GTX1650, "sdxl", compile=True).compile is False  # sequential offload
    assert choose_profile(RTX4090, "sdxl").compile is False  # opt-in only


@pytest.mark.parametrize(
    ("info", "family", "slots"),
    [
        (cpu(False), "sdxl", 4), (MPS, "sd15", 4),
        (GTX1650, "sdxl", 2),  # sequential offload
        (RTX2070, "sd15", 5), (RTX2070, "sdxl", 2),  # a tenth of 8 GB: 5 x 150 MB, 1 x 450 MB
        (RTX4090, "sd15", 16), (RTX4090, "sdxl", 5), (RTX4090, None, 5),  # no family: SDXL
        (A100, "sdxl", 16),  # 18 fit; 16 at most
    ],
)
def test_lora_slots_follow_the_cards_memory(info: DeviceInfo, family: str | None,
                                            slots: int) -> None:
    p = choose_profile(info, family)
    assert p.lora_slots == slots
    (why,) = [r for r in p.reasons if r.startswith("lora slots")]
    assert why.startswith(f"lora slots {slots} per model: ")
    assert f"lora slots   {slots} per model" in describe_profile(p)


def test_choose_profile_is_pure() -> None:
    assert choose_profile(RTX2070, "sdxl") == choose_profile(RTX2070, "sdxl")


def test_describe_profile_gives_each_reason() -> None:
    p = choose_profile(RTX2070, "sdxl")
    text = describe_profile(p)
    assert "cuda:0 (NVIDIA GeForce RTX 2070 SUPER, 8 GB)" in text
    assert "rtx2070super-8gb" in text
    for reason in p.reasons:
        assert f"  - {reason}" in text
    assert all("\n" not in r for r in p.reasons)


def test_detect_devices_here() -> None:
    found = detect_devices()
    here = found[-1]
    assert here.kind == "cpu"
    assert here.cores >= 1 and here.logical_cpus >= here.cores
    assert here.total_memory and here.total_memory > 2**30
    assert here.sdpa is True
    assert all(d.kind in ("cuda", "rocm", "mps", "xpu", "cpu") for d in found)
    # The decision for this machine is always possible.
    assert choose_profile(found[0]).device


def test_apply_profile_on_cpu() -> None:
    pipe = build_tiny_pipeline("sd15")
    profile = choose_profile(cpu(True, cores=1), "sd15")
    assert apply_profile(pipe, profile) is pipe
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    assert pipe.vae.use_slicing is True and pipe.vae.use_tiling is False
    assert torch.get_num_threads() == 1
    out = pipe("a fox", num_inference_steps=2, width=64, height=64, output_type="np")
    assert out.images.shape == (1, 64, 64, 3)
