"""Fit the conditional prior.

    python train_mapper.py --condition class --vqvae_directory runs/vqvae-mnist --output_dir runs/prior-mnist

`--condition class` estimates one Gaussian per class from the cached training latents (a
Gaussian mixture with a component per class) and writes prior.safetensors and prior.json.
It prints the expected transport cost E|x1 - x0|^2 of independent pairs drawn from this
prior, against the same for N(0, I).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dataset import add_dataset_args, dataset_from_args
from flow import COVARIANCES, ClassGaussianPrior, independent_transport_cost
from latent_cache import load_or_encode
from neural_models import load_codec
from training_utils import UserError, cli_entry, init_distributed, pick_device


def transport_costs(prior: ClassGaussianPrior, latents: torch.Tensor, labels: torch.Tensor) -> dict:
    """Expected E|x1 - x0|^2 per sample under independent pairing, for this prior and N(0, I)."""
    d = latents[0].numel()
    cpd = independent_transport_cost(latents, prior.means[labels], prior.scale**2 * prior.trace()[labels])
    normal = independent_transport_cost(latents, torch.zeros_like(latents), torch.full((len(latents),), float(d)))
    return {"transport_cost_prior": cpd, "transport_cost_standard_normal": normal, "transport_cost_ratio": cpd / normal}


def fit_class_prior(args: argparse.Namespace) -> dict:
    """Under torchrun the ranks share the encoding, then each fits on all latents: the same prior."""
    rank, world = init_distributed()
    device = pick_device(args.device)
    probe = dataset_from_args(args, "train")
    if probe.conditioning != "class":
        raise UserError(f"--condition class needs a class-labelled dataset; {args.dataset} has captions")
    codec = load_codec(args.vqvae_directory, probe.channels, args.image_size)
    latents, labels = load_or_encode(codec, lambda: probe, args, "train", device, rank, world)
    prior = ClassGaussianPrior.fit(latents, labels, probe.num_classes, args.covariance, args.rank, args.shrinkage)
    report = transport_costs(prior, latents, labels)
    if rank > 0:
        return report
    prior.save(args.output_dir, dict(
        codec=codec.fingerprint, dataset=args.dataset, image_size=args.image_size,
        vqvae_directory=args.vqvae_directory, num_train_latents=len(latents), **report,
    ))
    print(json.dumps(report))
    print(f"class prior ({args.covariance} covariance) saved to {Path(args.output_dir) / 'prior.safetensors'}")
    return report


@cli_entry
def main(args: argparse.Namespace) -> dict:
    if args.condition != "class":
        raise UserError("--condition text is not implemented yet")
    return fit_class_prior(args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(parser)
    parser.add_argument("--condition", default="class", choices=("class", "text"))
    parser.add_argument("--vqvae_directory", "--vqae_directory", default=None,
                        help="saved VQ-VAE (diffusers VQModel); omit to work in pixel space")
    parser.add_argument("--output_dir", default="runs/prior-mnist")
    parser.add_argument("--covariance", default="diag", choices=COVARIANCES,
                        help="class covariance: diag scales to 1000 classes x 1024 dims; full needs C*D*D floats")
    parser.add_argument("--rank", type=int, default=16, help="rank of the low-rank part (--covariance lowrank)")
    parser.add_argument("--shrinkage", type=float, default=0.05, help="blend of (trace/D) I into each covariance")
    parser.add_argument("--num_train_epochs", type=int, default=20, help="text mapper only")
    parser.add_argument("--batch_size", type=int, default=256, help="text mapper only")
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="text mapper only")
    parser.add_argument("--device", default=None)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
