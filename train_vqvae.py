"""Train a diffusers VQModel on any dataset; saved with save_pretrained.

    python train_vqvae.py --dataset mnist --output_dir runs/vqvae-mnist

Loss: reconstruction MSE plus the VQ codebook and commitment terms. After training the
latent scaling factor is set to 1/std of the training latents (as in latent diffusion), the
test split's reconstruction MSE and PSNR are reported, and a PNG of originals above
reconstructions is written next to the weights.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import VQModel
from torch.utils.data import DataLoader
from torchvision.utils import save_image
from tqdm import tqdm

from dataset import add_dataset_args, build_dataset, dataset_from_args
from neural_models import VQVAECodec, vqvae_config
from training_utils import UserError, cli_entry, pick_device, seed_everything, write_json


@torch.no_grad()
def restart_dead_codes(vqvae: VQModel, latents: torch.Tensor, usage: torch.Tensor) -> int:
    """Move unused codebook vectors onto random encoder outputs, so the codebook cannot collapse.

    Called with all codes unused at the first step, this is a data-dependent initialisation.
    """
    dead = (usage == 0).nonzero().squeeze(1)
    if len(dead):
        flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        pick = torch.randint(len(flat), (len(dead),), device=flat.device)
        vqvae.quantize.embedding.weight.data[dead] = flat[pick]
    return len(dead)


def code_usage(vqvae: VQModel, latents: torch.Tensor) -> torch.Tensor:
    _, _, (_, _, indices) = vqvae.quantize(latents)
    return torch.bincount(indices.flatten(), minlength=vqvae.quantize.n_e)


def infinite(loader: DataLoader):
    for epoch in itertools.count():
        yield from loader


@torch.no_grad()
def latent_std(vqvae: VQModel, loader: DataLoader, device: torch.device, max_batches: int = 20) -> float:
    latents = [vqvae.encode(x.to(device)).latents for x, _ in itertools.islice(loader, max_batches)]
    return torch.cat(latents).std().item()


@torch.no_grad()
def evaluate(codec: VQVAECodec, loader: DataLoader, device: torch.device) -> dict:
    """Reconstruction MSE and PSNR, on images mapped to [0, 1]."""
    sq_err, count = 0.0, 0
    for x, _ in tqdm(loader, desc="eval", leave=False):
        x = x.to(device)
        recon = codec.decode(codec.encode(x))
        sq_err += F.mse_loss((recon + 1) / 2, (x + 1) / 2, reduction="sum").item()
        count += x.numel()
    mse = sq_err / count
    return {"test_mse": mse, "test_psnr": 10 * math.log10(1.0 / mse)}


@cli_entry
def main(args: argparse.Namespace) -> dict:
    seed_everything(args.seed)
    device = pick_device(args.device)
    train_set = dataset_from_args(args, "train")
    test_set = build_dataset(args.dataset, "test", args.data_dir, args.image_size, args.max_eval_samples)
    if len(train_set) < args.batch_size:
        raise UserError(f"--batch_size {args.batch_size} exceeds the {len(train_set)} training images")
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.num_workers)
    max_steps = args.max_steps or args.num_train_epochs * len(loader)

    config = vqvae_config(train_set.channels, args.image_size, args.latent_channels, args.num_vq_embeddings)
    vqvae = VQModel(**config).to(device)
    optimizer = torch.optim.AdamW(vqvae.parameters(), lr=args.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.learning_rate, total_steps=max_steps, pct_start=0.05)

    start = time.perf_counter()
    progress = tqdm(itertools.islice(infinite(loader), max_steps), total=max_steps, desc="vqvae")
    usage = torch.zeros(vqvae.quantize.n_e, dtype=torch.long, device=device)
    for step, (x, _) in enumerate(progress):
        x = x.to(device)
        latents = vqvae.encode(x).latents
        if step % args.restart_every == 0 and step < max_steps // 2:
            restart_dead_codes(vqvae, latents.detach(), usage)
            usage.zero_()
        out = vqvae.decode(latents)  # quantises, and returns the codebook + commitment loss
        usage += code_usage(vqvae, latents.detach())
        recon_loss = F.mse_loss(out.sample, x)
        loss = recon_loss + out.commit_loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        progress.set_postfix(recon=f"{recon_loss.item():.4f}", vq=f"{out.commit_loss.mean().item():.4f}")
    train_seconds = time.perf_counter() - start

    vqvae.eval()
    vqvae.register_to_config(scaling_factor=1.0 / latent_std(vqvae, loader, device))
    output_dir = Path(args.output_dir)
    vqvae.save_pretrained(output_dir)

    codec = VQVAECodec(vqvae)
    test_loader = DataLoader(test_set, batch_size=256, num_workers=args.num_workers)
    report = evaluate(codec, test_loader, device)
    report.update(train_seconds=round(train_seconds, 1), steps=max_steps, latent_shape=list(codec.latent_shape),
                  scaling_factor=vqvae.config.scaling_factor)
    x = next(iter(test_loader))[0][:16].to(device)
    save_image(torch.cat([x, codec.decode(codec.encode(x))]).add(1).div(2), output_dir / "reconstructions.png", nrow=16)
    write_json(output_dir / "report.json", report)
    print(json.dumps(report))
    print(f"VQ-VAE saved to {output_dir} (originals above reconstructions in {output_dir / 'reconstructions.png'})")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(parser)
    parser.add_argument("--output_dir", default="runs/vqvae-mnist")
    parser.add_argument("--max_steps", type=int, default=None, help="overrides --num_train_epochs")
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--latent_channels", type=int, default=4)
    parser.add_argument("--num_vq_embeddings", type=int, default=256)
    parser.add_argument("--max_eval_samples", type=int, default=None, help="score a random subset of the test split")
    parser.add_argument("--restart_every", type=int, default=50, help="re-seed unused codes this often (first half of training)")
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
