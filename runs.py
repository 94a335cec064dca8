"""What a training run is made of, shared by train.py and sample.py: the method's prior, the
saved network, and decoding latents into image grids."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNet2DModel

from checkpoints import load_checkpoint, resolve_checkpoint
from flow import ClassGaussianPrior, MapperPrior, StandardNormalPrior
from neural_models import build_unet, load_codec, load_text_encoder
from training_utils import UserError, read_json

# Each method's default coupling.
METHODS = {"cpd": "independent", "condot": "independent", "batchot": "ot", "ddpm": "independent"}


class ClassConditioning:
    """Class labels: the UNet's class embedding, with index num_classes as the null class."""

    def __init__(self, labels: torch.Tensor, num_classes: int):
        self.labels, self.null = labels, num_classes

    def draw(self, idx: torch.Tensor, dropout: float) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """(UNet kwargs with guidance dropout, the prior's input, groups for class-aware OT)."""
        y = self.labels[idx]
        dropped = torch.rand(len(y), device=y.device) < dropout
        return {"class_labels": torch.where(dropped, self.null, y)}, y, y

    def for_sampling(self, labels: torch.Tensor) -> tuple[dict, dict, torch.Tensor]:
        """(condition kwargs, null kwargs, the prior's input)."""
        return {"class_labels": labels}, {"class_labels": torch.full_like(labels, self.null)}, labels


class TextConditioning:
    """Captions: cached token states for cross-attention and pooled embeddings for the prior.

    `table` holds the encodings of every distinct caption, the empty caption (the null
    condition) at index 0; item i draws one of ids[spans[i, 0] : spans[i, 0] + spans[i, 1]].
    """

    def __init__(self, table: dict[str, torch.Tensor], ids: torch.Tensor, spans: torch.Tensor):
        self.table, self.ids, self.spans = table, ids, spans

    def kwargs(self, caption_ids: torch.Tensor) -> dict:
        return {"encoder_hidden_states": self.table["states"][caption_ids],
                "encoder_attention_mask": self.table["mask"][caption_ids]}

    def draw(self, idx: torch.Tensor, dropout: float) -> tuple[dict, torch.Tensor, torch.Tensor]:
        offsets, counts = self.spans[idx].unbind(1)
        pick = (torch.rand(len(idx), device=idx.device) * counts).long()
        caption_ids = self.ids[offsets + pick]
        dropped = torch.rand(len(idx), device=idx.device) < dropout
        return self.kwargs(torch.where(dropped, 0, caption_ids)), self.table["pooled"][caption_ids], caption_ids

    def for_sampling(self, caption_ids: torch.Tensor) -> tuple[dict, dict, torch.Tensor]:
        return self.kwargs(caption_ids), self.kwargs(torch.zeros_like(caption_ids)), self.table["pooled"][caption_ids]

    @staticmethod
    def for_prompts(encoder, prompts: list[str]) -> tuple[dict, dict, torch.Tensor]:
        enc = encoder([*prompts, ""])
        n = len(prompts)
        cond = {"encoder_hidden_states": enc["states"][:n], "encoder_attention_mask": enc["mask"][:n]}
        null = {"encoder_hidden_states": enc["states"][n:].expand(n, -1, -1),
                "encoder_attention_mask": enc["mask"][n:].expand(n, -1)}
        return cond, null, enc["pooled"][:n]


def build_prior(config: dict, codec, device: torch.device):
    """The method's x0 distribution, checked against the latent space it must live in."""
    if config["method"] != "cpd":
        return StandardNormalPrior(codec.latent_shape)
    if config["condition"] == "text":
        prior = MapperPrior.load(config["prior_dir"], config["sigma"], config.get("weights_projector_path"),
                                 config.get("load_z"))
        if prior.config.get("text_encoder") != config["text_encoder"]:
            raise UserError(f"the mapper in {config['prior_dir']} reads {prior.config.get('text_encoder')!r} embeddings, "
                            f"but this run uses {config['text_encoder']!r}")
    else:
        prior = ClassGaussianPrior.load(config["prior_dir"], scale=config["sigma"])
    if tuple(prior.latent_shape) != tuple(codec.latent_shape) or prior.config.get("codec") != codec.fingerprint:
        raise UserError(
            f"the prior in {config['prior_dir']} was fitted to another latent space "
            f"(shape {tuple(prior.latent_shape)}, VQ-VAE {prior.config.get('codec')}) than this run's "
            f"(shape {tuple(codec.latent_shape)}, VQ-VAE {codec.fingerprint}); refit it with train_mapper.py"
        )
    if config["condition"] == "class" and prior.num_classes != config["num_classes"]:
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
    """config, EMA network, prior, codec, (ddpm) scheduler and (text) encoder of a run, ready to sample.

    The network is the final unet/ folder, or the EMA weights of `checkpoint` (latest or a path).
    """
    run_dir = Path(run_dir)
    config = read_json(run_dir / "config.json", "run config")
    codec = load_codec(config["vqvae_directory"], config["channels"], config["image_size"])
    if checkpoint is None and (run_dir / "unet" / "config.json").is_file():
        cls = UNet2DConditionModel if config["condition"] == "text" else UNet2DModel
        unet = cls.from_pretrained(run_dir / "unet", low_cpu_mem_usage=False)
    elif checkpoint is None:
        raise UserError(f"{run_dir} has no final network (unet/); pass --checkpoint latest to use its last checkpoint")
    else:
        unet = build_unet(config["unet"])
        state = load_checkpoint(resolve_checkpoint(run_dir, checkpoint))
        for param, shadow in zip(unet.parameters(), state["ema"]["shadow_params"]):
            param.data.copy_(shadow)
    encoder = load_text_encoder(config["text_encoder"], device) if config["condition"] == "text" else None
    return dict(config=config, unet=unet.to(device).eval(), prior=build_prior(config, codec, device),
                codec=codec.to(device), scheduler=sampling_scheduler(config), text_encoder=encoder)


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
