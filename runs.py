"""What a training run is made of, shared by train.py and sample.py: the method's prior, the
saved network, and decoding latents into image grids."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DDIMScheduler, UNet2DModel

from checkpoints import load_checkpoint, resolve_checkpoint
from flow import ClassGaussianPrior, StandardNormalPrior
from neural_models import build_unet, load_codec
from training_utils import UserError, read_json

# Each method's default coupling.
METHODS = {"cpd": "independent", "condot": "independent", "batchot": "ot", "ddpm": "independent"}


def build_prior(config: dict, codec, device: torch.device):
    """The method's x0 distribution, checked against the latent space it must live in."""
    if config["method"] != "cpd":
        return StandardNormalPrior(codec.latent_shape)
    prior = ClassGaussianPrior.load(config["prior_dir"], scale=config["sigma"])
    if tuple(prior.latent_shape) != tuple(codec.latent_shape) or prior.config.get("codec") != codec.fingerprint:
        raise UserError(
            f"the prior in {config['prior_dir']} was fitted to another latent space "
            f"(shape {tuple(prior.latent_shape)}, VQ-VAE {prior.config.get('codec')}) than this run's "
            f"(shape {tuple(codec.latent_shape)}, VQ-VAE {codec.fingerprint}); refit it with train_mapper.py"
        )
    if prior.num_classes != config["num_classes"]:
        raise UserError(f"the prior in {config['prior_dir']} has {prior.num_classes} classes, the data {config['num_classes']}")
    return prior.to(device)


def save_unet(unet: UNet2DModel, directory: Path) -> None:
    """save_pretrained into a temporary folder, then swap it in, so a crash leaves no half model."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    unet.save_pretrained(tmp)
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)


def load_run(run_dir: str | Path, checkpoint: str | None, device: torch.device) -> dict:
    """config, EMA network, prior, codec and (ddpm) scheduler of a run, ready to sample.

    The network is the final unet/ folder, or the EMA weights of `checkpoint` (latest or a path).
    """
    run_dir = Path(run_dir)
    config = read_json(run_dir / "config.json", "run config")
    codec = load_codec(config["vqvae_directory"], config["channels"], config["image_size"])
    if checkpoint is None and (run_dir / "unet" / "config.json").is_file():
        unet = UNet2DModel.from_pretrained(run_dir / "unet", low_cpu_mem_usage=False)
    elif checkpoint is None:
        raise UserError(f"{run_dir} has no final network (unet/); pass --checkpoint latest to use its last checkpoint")
    else:
        unet = build_unet(config["unet"])
        state = load_checkpoint(resolve_checkpoint(run_dir, checkpoint))
        for param, shadow in zip(unet.parameters(), state["ema"]["shadow_params"]):
            param.data.copy_(shadow)
    return dict(config=config, unet=unet.to(device).eval(), prior=build_prior(config, codec, device),
                codec=codec.to(device), scheduler=sampling_scheduler(config))


def training_scheduler(config: dict) -> DDPMScheduler | None:
    return DDPMScheduler(num_train_timesteps=1000) if config["method"] == "ddpm" else None


def sampling_scheduler(config: dict) -> DDIMScheduler | None:
    """DDIM for the ddpm baseline; "trailing" spacing starts at the last timestep, as few-step sampling needs."""
    if config["method"] != "ddpm":
        return None
    return DDIMScheduler.from_config(training_scheduler(config).config, timestep_spacing="trailing")


@torch.no_grad()
def decode_grid(codec, latents: torch.Tensor) -> torch.Tensor:
    """Latents to images in [0, 1], ready for torchvision's save_image."""
    return codec.decode(latents).add(1).div(2).clamp(0, 1).cpu()
