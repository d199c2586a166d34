"""Random-weight pipelines built offline: tiny ones for tests and demos, SD1.5-shaped ones for
benchmarks. Both save as ordinary Diffusers folders, so they load like any real model."""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTextConfig, CLIPTokenizer

    from engine.pipelines import Pipeline as DiffusionPipeline

TinyFamily = Literal["sd15", "sdxl"]
TINY_FAMILIES: tuple[str, ...] = ("sd15", "sdxl")

# CLIP's window; the tokenizer pads/truncates to it, and the text model's positions match.
MAX_LENGTH = 77
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# A handful of merges so multi-character tokens exist (a real CLIP vocab has ~48k of them).
_MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("i", "n"),
    ("e", "r</w>"),
    ("o", "n</w>"),
    ("a", "t</w>"),
    ("s", "t"),
    ("e", "n"),
    ("o", "r"),
    ("l", "i"),
    ("g", "h"),
    ("a", "r"),
    ("o", "u"),
    ("e", "d</w>"),
    ("in", "g</w>"),
)

# Scheduler config of the published SD checkpoints (Euler is what A1111 users default to).
_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


# Everyday prompt words, so a tiny model's tokenizer counts roughly one token per word like
# CLIP's does (a byte-level one would count letters and refuse every styled prompt).
_COMMON_WORDS = (
    "a an the of and with in on at by for from to under over near is are my your this that "
    "cat dog fox bird horse dragon robot castle city forest mountain river lake sea ocean sky "
    "sun moon star stars night day dusk dawn sunset sunrise rain snow fog storm cloud clouds "
    "red blue green yellow orange purple pink black white gray grey gold silver brown "
    "portrait landscape painting photo photograph drawing sketch illustration render art "
    "lighthouse tree trees flower flowers garden house street car ship boat window windowsill "
    "man woman girl boy child old young small big tiny giant cute happy sad dark light bright "
    "beautiful epic magical ancient futuristic cyberpunk fantasy style detailed"
)


def _vocab_words(extra: Iterable[str] = ()) -> list[str]:
    from core.prompts import DEFAULT_NEGATIVE, QUALITY_TERMS, SAFE_NEGATIVE
    from core.styles import default_registry

    text = " ".join(
        [_COMMON_WORDS, *QUALITY_TERMS, *DEFAULT_NEGATIVE, *SAFE_NEGATIVE, *extra]
        + [f"{st.prompt} {st.negative}" for st in default_registry().all()]
    )
    words = {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 1}
    return sorted(words, key=lambda w: (-len(w), w))  # long words first: their chains win


def _word_merges(extra: Iterable[str] = ()) -> list[tuple[str, str]]:
    """Merges that build each vocabulary word left to right (``c a`` -> ``ca``, ``ca t</w>``)."""
    seen: set[tuple[str, str]] = set()
    out: list[tuple[str, str]] = []
    for word in _vocab_words(extra):
        pieces = [*word[:-1], word[-1] + "</w>"]
        acc = pieces[0]
        for piece in pieces[1:]:
            pair = (acc, piece)
            if pair not in seen:
                seen.add(pair)
                out.append(pair)
            acc += piece
    return out


def clip_vocab(extra_words: Iterable[str] = ()) -> tuple[dict[str, int], list[str]]:
    """A small CLIP-style vocabulary and its merges.

    Layout follows CLIP's: the 256 byte symbols, the same with ``</w>``, the merge results,
    then the start and end tokens last (so the end token has the highest id, which CLIP's
    pooling relies on when it looks for the end of each prompt).
    """
    merges = [*_word_merges(extra_words), *_MERGES]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}, [f"{a} {b}" for a, b in merges]


def write_tokenizer_files(directory: Path, extra_words: Iterable[str] = ()) -> Path:
    """Write the ``vocab.json`` + ``merges.txt`` a CLIPTokenizer loads from into ``directory``
    (``extra_words``: whole-word tokens besides the everyday and style words)."""
    vocab, merges = clip_vocab(extra_words)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    return directory


def build_tokenizer(extra_words: Iterable[str] = ()) -> CLIPTokenizer:
    """A CLIPTokenizer over :func:`clip_vocab`, padding/truncating to 77 tokens like CLIP's."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        files = write_tokenizer_files(Path(tmp), extra_words)
        return CLIPTokenizer(
            vocab=str(files / "vocab.json"),
            merges=str(files / "merges.txt"),
            model_max_length=MAX_LENGTH,
        )


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The pieces BPE leaves ``word`` in (CLIP's: the last letter carries ``</w>``)."""
    pieces = [*word[:-1], word[-1] + "</w>"]
    while len(pieces) > 1:
        rank, at = min((ranks.get(pair, len(ranks)), i)
                       for i, pair in enumerate(zip(pieces, pieces[1:], strict=False)))
        if rank == len(ranks):
            break
        pieces[at:at + 2] = [pieces[at] + pieces[at + 1]]
    return pieces


def whole_word_merges(merges: list[tuple[str, str]], words: Iterable[str]
                      ) -> list[tuple[str, str]]:
    """Merges to append after ``merges`` so each of ``words`` is one token: it is joined, left
    to right, from the pieces ``merges`` leave it in. Ranked after every earlier merge, they
    change no other text's tokens unless it holds the same run of pieces (unlike adding the
    words to ``clip_vocab``'s, whose left-to-right chains would re-rank everything)."""
    ranks = {pair: i for i, pair in enumerate(merges)}
    out: list[tuple[str, str]] = []
    for word in words:
        pieces = _bpe(word, ranks)
        acc = pieces[0]
        for piece in pieces[1:]:
            if (acc, piece) not in ranks:
                ranks[(acc, piece)] = len(ranks)
                out.append((acc, piece))
            acc += piece
    return out


def extend_tokenizer(tokenizer: CLIPTokenizer, words: Iterable[str]) -> CLIPTokenizer:
    """``tokenizer`` (one of ours) with each of ``words`` a whole token: its vocabulary and
    merges kept, the new merges (``whole_word_merges``) last, the new tokens before the start
    and end tokens (which stay last, as ``clip_vocab`` lays them out: their ids move)."""
    from transformers import CLIPTokenizer

    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    added = whole_word_merges(merges, words)  # type: ignore[arg-type]
    old = sorted(model["vocab"], key=model["vocab"].__getitem__)
    tokens = [t for t in old if t not in (BOS, EOS)] + [a + b for a, b in added] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
        (Path(tmp) / "merges.txt").write_text(
            "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in [*merges, *added]) + "\n",
            "utf-8")
        return CLIPTokenizer(vocab=str(Path(tmp) / "vocab.json"),
                             merges=str(Path(tmp) / "merges.txt"), model_max_length=MAX_LENGTH)


def text_config(
    tokenizer: CLIPTokenizer,
    *,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int,
    projection_dim: int | None = None,
    vocab_size: int | None = None,
) -> CLIPTextConfig:
    from transformers import CLIPTextConfig

    extra: dict[str, Any] = {} if projection_dim is None else {"projection_dim": projection_dim}
    end = int(tokenizer.convert_tokens_to_ids(EOS))  # type: ignore[arg-type]
    return CLIPTextConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        # Pooling picks the hidden state at eos_token_id, so these must be the real ids.
        bos_token_id=int(tokenizer.convert_tokens_to_ids(BOS)),  # type: ignore[arg-type]
        eos_token_id=end,
        pad_token_id=end,
        **extra,
    )


def build_tiny_pipeline(family: TinyFamily = "sd15", seed: int = 0) -> DiffusionPipeline:
    """An in-memory tiny random-weight pipeline of ``family`` (fp32, CPU).

    Shapes follow Diffusers' own fast tests (UNet (32, 64), cross-attention 32, CLIP 32 wide
    x 5 layers), except the VAE has 4 blocks so that, as in the real models, latents are 8x
    smaller than pixels (64x64 -> 8x8).
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if family not in TINY_FAMILIES:
        raise ValueError(f"family must be one of {TINY_FAMILIES}, got {family!r}")

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    scheduler = EulerDiscreteScheduler(**_SCHEDULER)
    text_kw = {"hidden": 32, "layers": 5, "heads": 4, "intermediate": 37}

    if family == "sd15":
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
        )
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(text_config(tokenizer, **text_kw))
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    # SDXL: two text encoders whose hidden states are concatenated (32 + 32 = 64 for
    # cross-attention); the second one's pooled projection plus six micro-conditioning
    # numbers (original size, crop, target size), each embedded to addition_time_embed_dim,
    # form the "text_time" added embedding.
    time_dim = 8
    proj_dim = 32
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=2 * text_kw["hidden"],
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + proj_dim,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_config(tokenizer, **text_kw))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(
        text_config(tokenizer, projection_dim=proj_dim, **text_kw)
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def make_tiny(directory: Path | str, family: TinyFamily = "sd15", seed: int = 0) -> Path:
    """Build a tiny ``family`` pipeline and save it as a Diffusers folder at ``directory``."""
    directory = Path(directory)
    pipe = build_tiny_pipeline(family, seed)
    directory.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


# Folder names under {data_dir}/models that the packaged registry's "tiny" entries point at.
TINY_MODEL_DIRS: dict[str, str] = {"sd15": "tiny-sd15", "sdxl": "tiny-sdxl"}


def make_tiny_models(
    models_dir: Path | str, *, seed: int = 0, overwrite: bool = False
) -> dict[str, Path]:
    """Build every tiny family under ``models_dir`` (``atelier models make-tiny``).

    Folders that already hold a pipeline are kept unless ``overwrite``.
    """
    out: dict[str, Path] = {}
    for family, folder in TINY_MODEL_DIRS.items():
        target = Path(models_dir) / folder
        if overwrite or not (target / "model_index.json").is_file():
            make_tiny(target, family, seed)  # type: ignore[arg-type]
        out[family] = target
    return out


# SD1.5-shaped -------------------------------------------------------------------------------

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT = {"hidden": 768, "layers": 12, "heads": 12, "intermediate": 3072, "vocab_size": 49408}


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly in ``dtype`` (half the peak memory of fp32-then-cast)."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def sd15_shaped_components(
    dtype: torch.dtype | None = None, seed: int = 0
) -> dict[str, object]:
    """UNet, VAE and text encoder with the published SD1.5 configs and random weights.

    With ``dtype=None`` nothing is allocated (meta tensors): enough to inspect shapes and
    parameter counts cheaply.
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = build_tokenizer()
    text_cfg = text_config(tokenizer, **SD15_TEXT)  # type: ignore[arg-type]
    # The real model's 49408-entry embedding; the small tokenizer's ids (< 600) all fall in it.
    torch.manual_seed(seed)
    if dtype is None:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**SD15_UNET)
            vae = AutoencoderKL(**SD15_VAE)
            text_encoder = CLIPTextModel(text_cfg)
    else:
        with _default_dtype(dtype):
            unet = UNet2DConditionModel(**SD15_UNET)
            vae = AutoencoderKL(**SD15_VAE)
            text_encoder = CLIPTextModel(text_cfg)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": EulerDiscreteScheduler(**_SCHEDULER),
    }


def build_sd15_shaped_pipeline(
    dtype: torch.dtype | None = None, seed: int = 0
) -> DiffusionPipeline:
    """An in-memory SD1.5-shaped pipeline (~1.07 B random parameters), default bf16.

    bf16 halves both the build's memory (~2 GB instead of ~4 GB) and, on CPUs with AVX512-BF16
    or AMX, the step time; pass ``torch.float32`` for the fp32 baseline.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    parts = sd15_shaped_components(dtype or torch.bfloat16, seed)
    return StableDiffusionPipeline(
        **parts,  # type: ignore[arg-type]
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_sd15_shaped(directory: Path | str, seed: int = 0,
                     dtype: torch.dtype | None = None) -> Path:
    """Save an SD1.5-shaped random pipeline at ``directory`` (~2 GB in bf16)."""
    directory = Path(directory)
    pipe = build_sd15_shaped_pipeline(dtype, seed)
    directory.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


# A LoRA's weights file name in the folder ``make_tiny_lora`` writes.
TINY_LORA_FILE = "tiny-lora.safetensors"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def make_tiny_lora(
    model_dir: Path | str, directory: Path | str, *, seed: int = 0, rank: int = 4,
    scale: float = 0.5,
) -> Path:
    """A random LoRA on the UNet attention of the Diffusers folder ``model_dir`` (a tiny model),
    saved as ``directory/tiny-lora.safetensors`` as Diffusers saves a trained one. Its weights
    are random but non-zero (a fresh LoRA's are zero: it would change nothing)."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet", local_files_only=True)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS)))
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    xl = unet.config.get("addition_embed_type") == "text_time"
    saver = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    saver.save_lora_weights(
        directory, unet_lora_layers=state, weight_name=TINY_LORA_FILE, safe_serialization=True
    )
    return directory / TINY_LORA_FILE


def make_tiny_embedding(
    model_dir: Path | str, path: Path | str, *, seed: int = 0, vectors: int = 2
) -> Path:
    """A random textual-inversion embedding for the text encoder of ``model_dir`` (a tiny
    model), saved as A1111 saves one (``emb_params`` in a .safetensors file)."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((Path(model_dir) / "text_encoder" / "config.json").read_text("utf-8"))
    generator = torch.Generator("cpu").manual_seed(seed)
    weights = torch.randn((vectors, int(config["hidden_size"])), generator=generator)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": weights}, str(path))
    return path


def make_tiny_controlnet(model_dir: Path | str, directory: Path | str, *, seed: int = 0) -> Path:
    """A random ControlNet for the tiny Diffusers folder ``model_dir``, saved as a Diffusers
    folder at ``directory``. Built from the model's UNet as training starts, but with random
    zero-convolutions (a fresh ControlNet's are zero: it would change nothing)."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet", local_files_only=True)
    controlnet = ControlNetModel.from_unet(
        # three stride-2 steps: the VAE's 8x, from picture to latent size
        unet, conditioning_embedding_out_channels=(4, 8, 8, 16), load_weights_from_unet=True,
    )
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        # The picture's path strong enough that where its lines are shows in the output...
        for param in controlnet.controlnet_cond_embedding.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        # ...and zero-convolutions that pass it on (weights only: no constant shift).
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.3)
            conv.bias.zero_()
    directory = Path(directory)
    controlnet.save_pretrained(directory, safe_serialization=True)
    return directory
