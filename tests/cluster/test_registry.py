"""Model registry: packaged and user TOML, lookups, the models table, and loading (real Diffusers
code on tiny models; every failure a ModelLoadError naming the model and the fix)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from PIL import Image

from cluster.availability import registry_table_rows
from cluster.registry import Family, ModelLoadError, ModelRegistry, ModelSpec, how_to_get
from core.errors import ConfigError, InvalidRequest, ModelUnavailable
from core.request import JobKind
from core.settings import Settings
from engine.loading import derive_pipeline, load_pipeline

if TYPE_CHECKING:
    from tests.cluster.conftest import TinyModels


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, "utf-8")
    return path


# Packaged registry ------------------------------------------------------------------------


def test_packaged_models(settings: Settings) -> None:
    reg = ModelRegistry.load(settings)
    assert {"sd15", "sdxl", "sd-turbo", "sdxl-turbo", "tiny", "tiny-xl"} <= set(reg.names())
    assert reg.default == "sd15"
    assert reg.get().name == "sd15"
    sd15 = reg.get("sd15")
    assert (sd15.source, sd15.repo, sd15.family) == (
        "repo", "stable-diffusion-v1-5/stable-diffusion-v1-5", Family.sd15,
    )
    assert reg.get("sdxl").repo == "stabilityai/stable-diffusion-xl-base-1.0"
    assert reg.get("sdxl").default_width == 1024
    turbo = reg.get("sdxl-turbo")
    assert (turbo.family, turbo.default_steps, turbo.guidance) == (Family.sdxl_turbo, 1, 0.0)
    # {data_dir} expanded from Settings.
    assert reg.get("tiny").path == settings.data_dir / "models" / "tiny-sd15"
    assert reg.get("tiny-xl").path == settings.data_dir / "models" / "tiny-sdxl"
    assert all(s.scheduler in ("Euler", "Euler a", "DPM++ 2M Karras") for s in reg)


def test_unknown_model_names_the_choices(settings: Settings) -> None:
    reg = ModelRegistry.load(settings)
    with pytest.raises(InvalidRequest) as err:
        reg.get("sdxl-turob")
    msg = str(err.value)
    assert "unknown model 'sdxl-turob'" in msg
    assert "did you mean 'sdxl-turbo'" in msg
    assert "available: sd15, sdxl" in msg
    assert reg.get("SDXL").name == "sdxl"  # names are case-insensitive


# User files -------------------------------------------------------------------------------


def test_user_file_overrides_by_name_and_adds(settings: Settings, tmp_path: Path) -> None:
    user = write(
        tmp_path / "conf" / "models.toml",
        """
default = "mine"

[models.sd15]
path = "/models/sd15"

[models.mine]
file = "weights/mine.safetensors"
config = "./sdxl-configs"
family = "sdxl"
compile = true
quantize = "int8"
fast = true
""",
    )
    reg = ModelRegistry.load(settings, extra_path=user)
    sd15 = reg.get("sd15")
    # Only what the user set changes; the new source drops the repo's fp16 variant.
    assert (sd15.source, sd15.path, sd15.variant) == ("path", Path("/models/sd15"), None)
    assert (sd15.family, sd15.min_vram_gb, sd15.scheduler) == (Family.sd15, 4, "DPM++ 2M Karras")
    mine = reg.get("mine")
    assert reg.default == "mine"
    assert mine.file == tmp_path / "conf" / "weights" / "mine.safetensors"  # relative to file
    assert mine.config == str(tmp_path / "conf" / "sdxl-configs")
    assert (mine.default_width, mine.default_steps) == (1024, 30)  # family defaults
    assert (mine.compile, mine.quantize, mine.fast) == (True, "int8", True)
    assert "sdxl" in reg  # the packaged ones are still there
    write(user, '[models.mine]\nrepo = "a/b"\nfamily = "sdxl"\nquantize = "fp8"\n')
    assert ModelRegistry.load(settings, extra_path=user).get("mine").quantize == "fp8"


def test_user_file_in_data_dir_is_found(settings: Settings) -> None:
    write(settings.data_dir / "models.toml", '[models.tiny]\nmax_steps = 8\n')
    assert ModelRegistry.load(settings).get("tiny").max_steps == 8


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[models.x]\nrepo = 'a/b'\nfamily = 'sd3'\n", "model 'x': family must be one of"),
        ("[models.x]\nrepo = 'a/b'\npath = '/p'\nfamily = 'sd15'\n", "exactly one of repo"),
        ("[models.x]\nfamily = 'sd15'\n", "exactly one of repo"),
        ("[models.x]\nrepo = 'a/b'\nfamily = 'sd15'\nwidht = 512\n", "widht"),
        ("[models.x]\nrepo = 'a/b'\nfamily = 'sd15'\ndefault_width = 500\n", "multiple of 8"),
        ("[models.x]\nrepo = 'a/b'\nfamily = 'sd15'\nscheduler = 'Heun'\n", "unknown scheduler"),
        ("[models.x]\nfile = '/m.bin'\nfamily = 'sd15'\n", ".safetensors or .ckpt"),
        ("[models.x]\nrepo = 'a/b'\nfamily = 'sd15'\ndefault_steps = 90\n", "exceeds max_steps"),
        ("default = 'nope'\n", "default model 'nope' is not in the registry"),
        ("[models.x\n", "is not valid TOML"),
        ("model = 1\n", "unknown top-level keys"),
        ("[models.x]\nrepo = 'a/b'\nfamily = 'sd15'\nquantize = 'nf4'\n", "quantize"),
    ],
)
def test_bad_user_file_is_a_config_error(
    settings: Settings, tmp_path: Path, text: str, expected: str
) -> None:
    user = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as err:
        ModelRegistry.load(settings, extra_path=user)
    assert expected in str(err.value)


def test_missing_user_file_is_a_config_error(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ATELIER_MODELS_FILE"):
        ModelRegistry.load(settings, extra_path=tmp_path / "nope.toml")


# Table ------------------------------------------------------------------------------------


def test_table_rows(tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a machine whose Hugging Face cache is empty, whatever this one holds.
    monkeypatch.setattr("cluster.registry.hub_cached", lambda repo: False)
    rows = {r["name"]: r for r in registry_table_rows(tiny_models.registry, offline=True)}
    assert rows["tiny"]["available"] is True
    assert rows["tiny-xl"]["available"] is True
    assert rows["sd15"]["available"] is False
    assert rows["sd15"]["default"] is True
    assert rows["sdxl"] | {"available": None} == {
        "name": "sdxl",
        "default": False,
        "family": "sdxl",
        "source": "repo:stabilityai/stable-diffusion-xl-base-1.0",
        "min_vram_gb": 8,
        "default_size": "1024x1024",
        "max_size": "1536x1536",
        "default_steps": 30,
        "scheduler": "DPM++ 2M Karras",
        "available": None,
        "availability": "missing",
        "how": "run `huggingface-cli download stabilityai/stable-diffusion-xl-base-1.0` on a box "
        "with network and copy its Hugging Face cache here, or set path to a downloaded copy "
        "under [models.sdxl] in your models.toml (ATELIER_MODELS_FILE)",
        "description": "Stable Diffusion XL base 1.0",
    }


# Loading ----------------------------------------------------------------------------------


def spec(**fields: object) -> ModelSpec:
    base: dict[str, object] = {
        "name": "broken", "family": "sd15", "min_vram_gb": 0, "default_width": 64,
        "default_height": 64, "max_width": 512, "max_height": 512, "default_steps": 4,
        "max_steps": 50, "scheduler": "Euler", "guidance": 7.0,
    }
    return ModelSpec(**(base | fields))  # type: ignore[arg-type]


def load_error(s: ModelSpec) -> str:
    """The operator's message of a load failure a retry may mend (ModelLoadError)."""
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(s, torch_dtype=torch.float32, offline=True)
    assert err.value.model == s.name
    assert f"model '{s.name}' could not be loaded: " in str(err.value)
    return str(err.value)


def unavailable(s: ModelSpec, *, how: str | None = None) -> str:
    """A load failure no retry can mend (ModelUnavailable): the person's line names the model
    and how to get it, with no server path; the operator's detail (returned) has the paths."""
    with pytest.raises(ModelUnavailable) as err:
        load_pipeline(s, torch_dtype=torch.float32, offline=True)
    line = err.value.message
    assert err.value.model == s.name
    assert line.startswith(f"model '{s.name}' is not available: ")
    assert f". To get it: {how or how_to_get(s)}" in line
    assert "/" not in line.replace("`", "").split("To get it:")[0]  # no path in the why
    for where in (s.path, s.file):
        assert where is None or str(where) not in line
    assert f"model '{s.name}' could not be loaded: " in err.value.detail
    return err.value.detail


def test_offline_repo_not_cached(settings: Settings) -> None:
    sd15 = ModelRegistry.load(settings).get("sd15").model_copy(
        update={"repo": "atelier-tests/never-cached"}
    )
    msg = unavailable(sd15)
    assert "not in the local Hugging Face cache and there is no network" in msg
    assert 'set path = "/models/sd15"' in msg and "ATELIER_MODELS_FILE" in msg


def test_missing_folder(tiny_models: TinyModels, tmp_path: Path) -> None:
    msg = unavailable(spec(path=tmp_path / "nowhere", hint="build it with `atelier models x`"))
    assert f"folder {tmp_path / 'nowhere'} does not exist" in msg
    assert ". Build it with `atelier models x`, or point path" in msg
    assert "ATELIER_MODELS_FILE" in msg


def test_folder_that_is_not_a_pipeline(tmp_path: Path) -> None:
    msg = unavailable(spec(path=tmp_path))
    assert "has no model_index.json" in msg and "file = ..." in msg


def test_wrong_family(tiny_models: TinyModels) -> None:
    msg = unavailable(
        spec(path=tiny_models.sdxl, family="sd15"),
        how="set family to the right one under [models.broken] in your models.toml "
        "(ATELIER_MODELS_FILE)",
    )
    assert "it is a StableDiffusionXLPipeline, but its family 'sd15' expects" in msg


def test_corrupt_weights_in_folder(tiny_models: TinyModels, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_models.sd15, tmp_path / "copy")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "broken" in load_error(spec(path=folder))


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all" * 10])
def test_corrupt_single_file(tmp_path: Path, content: bytes) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(content)
    load_error(spec(file=f))


def test_missing_single_file(tmp_path: Path) -> None:
    assert "does not exist" in unavailable(spec(file=tmp_path / "gone.ckpt"))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_siblings_share_weights_and_run(tiny_models: TinyModels, family: str) -> None:
    s = tiny_models.registry.get(tiny_models.name(family))
    t2i = load_pipeline(s, torch_dtype=torch.float32, offline=True)
    assert derive_pipeline(t2i, JobKind.txt2img) is t2i
    img2img = derive_pipeline(t2i, JobKind.img2img)
    inpaint = derive_pipeline(t2i, JobKind.inpaint)
    assert "Img2Img" in type(img2img).__name__ and "Inpaint" in type(inpaint).__name__
    for sibling in (img2img, inpaint):
        assert sibling.unet is t2i.unet
        assert sibling.vae is t2i.vae
        assert sibling.text_encoder is t2i.text_encoder

    init = Image.new("RGB", (64, 64), (200, 120, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    g = torch.Generator().manual_seed(1)
    out = img2img("a fox", image=init, strength=0.5, num_inference_steps=4, generator=g)
    assert out.images[0].size == (64, 64)
    out = inpaint(
        "a fox", image=init, mask_image=mask, num_inference_steps=2, width=64, height=64,
        generator=g,
    )
    assert out.images[0].size == (64, 64)
