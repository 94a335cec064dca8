"""Networks: the VQ-VAE latent space (or plain pixels) and the velocity UNets.

The flow runs in the space a `Codec` defines: `encode` maps images in [-1, 1] to the model
space, `decode` maps back. `VQVAECodec` wraps a diffusers VQModel (pre-quantisation latents,
multiplied by the model's scaling factor); `PixelCodec` is the identity, for small images.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from diffusers import UNet2DModel, VQModel
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
    if isinstance(overrides, str):
        try:
            overrides = json.loads(Path(overrides).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"cannot read the UNet config {overrides}: {err}") from None
    config = dict(DEFAULT_UNET, **(overrides or {}))
    config.update(
        sample_size=latent_shape[-1],
        in_channels=latent_shape[0],
        out_channels=latent_shape[0],
        num_class_embeds=num_classes + 1,
    )
    return config


def build_unet(config: dict) -> UNet2DModel:
    try:
        return UNet2DModel(**config)
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
