"""Fit the conditional prior.

    python train_mapper.py --condition class --vqvae_directory runs/vqvae-mnist --output_dir runs/prior-mnist
    python train_mapper.py --condition text --vqvae_directory runs/vqvae-mnist --output_dir runs/mapper-mnist

`--condition class` estimates one Gaussian per class from the cached training latents (a
Gaussian mixture with a component per class) and writes prior.safetensors and prior.json.
It prints the expected transport cost E|x1 - x0|^2 of independent pairs drawn from this
prior, against the same for N(0, I).

`--condition text` trains the mapper from a pooled text embedding to a point in latent space
(MSE against the cached latents, so it regresses to the conditional mean) and saves it in
mapper/ with prior.json; `--dim_z K` adds a learned K-dim code per image, saved as the bank
z_final.safetensors, from which sampling draws z. It reports held-out MSE (and, on MNIST
captions, the MSE for wordings never seen in training) and the transport cost.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from dataset import add_dataset_args, dataset_from_args, digit_captions
from flow import COVARIANCES, ClassGaussianPrior, MapperPrior, independent_transport_cost
from latent_cache import caption_table, load_or_encode, load_or_encode_text
from neural_models import TextMapper, load_codec, load_text_encoder
from training_utils import atomic_write, cli_entry, init_distributed, pick_device, seed_everything, write_json


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


def train_text_mapper(mapper: TextMapper, text: torch.Tensor, latents: torch.Tensor, args: argparse.Namespace,
                      bank: torch.nn.Embedding | None = None) -> list[float]:
    """Regress latents on text embeddings (and each item's learned code): MSE, AdamW, clipping.

    `text` is (N, K, D): K candidate caption embeddings per item, one drawn per step.
    Returns the mean loss of each epoch.
    """
    params = list(mapper.parameters()) + (list(bank.parameters()) if bank is not None else [])
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate)
    n, losses = len(latents), []
    for _ in tqdm(range(args.num_train_epochs), desc="mapper"):
        epoch = []
        for idx in torch.randperm(n, device=latents.device).split(args.batch_size):
            pick = torch.randint(text.shape[1], (len(idx),), device=latents.device)
            z = bank(idx) if bank is not None else None
            loss = F.mse_loss(mapper(text[idx, pick], z), latents[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            epoch.append(loss.item())
        losses.append(sum(epoch) / len(epoch))
    return losses


def per_item_text(table: dict, ids: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """(N, K, D) pooled embeddings: each item's captions, repeated cyclically up to the longest list."""
    k = int(spans[:, 1].max())
    slots = spans[:, :1] + torch.arange(k) % spans[:, 1:]
    return table["pooled"][ids[slots]]


@torch.no_grad()
def mapper_report(prior: MapperPrior, text: torch.Tensor, latents: torch.Tensor) -> dict:
    """MSE of the mapper's point and the expected transport cost of its prior, against N(0, I)."""
    z = prior.z_mean.expand(len(text), -1) if prior.z_mean is not None else None
    mean = prior.mapper(text, z)
    d = latents[0].numel()
    cpd = independent_transport_cost(latents, mean, torch.full((len(latents),), prior.sigma**2 * d))
    normal = independent_transport_cost(latents, torch.zeros_like(latents), torch.full((len(latents),), float(d)))
    return {"mse": F.mse_loss(mean, latents).item(), "transport_cost_prior": cpd,
            "transport_cost_standard_normal": normal, "transport_cost_ratio": cpd / normal}


def fit_text_mapper(args: argparse.Namespace) -> dict:
    seed_everything(args.seed)
    device = pick_device(args.device)
    dataset = dataset_from_args(args, "train")
    codec = load_codec(args.vqvae_directory, dataset.channels, args.image_size)
    latents, items = load_or_encode(codec, lambda: dataset, args, "train", device)
    encoder = load_text_encoder(args.text_encoder, device)
    captions, ids, spans = caption_table(dataset.captions)
    table = load_or_encode_text(encoder, captions, codec.cache_dir)
    text = per_item_text(table, ids, spans[items]).to(device)
    latents = latents.to(device)

    held = torch.randperm(len(latents), generator=torch.Generator().manual_seed(args.seed))
    held, train = held[: int(len(held) * args.validation_fraction)], held[int(len(held) * args.validation_fraction):]
    mapper = TextMapper(encoder.dim, tuple(codec.latent_shape), args.dim_z).to(device)
    bank = torch.nn.Embedding(len(train), args.dim_z).to(device) if args.dim_z else None
    if bank is not None:
        torch.nn.init.normal_(bank.weight, std=0.1)
    losses = train_text_mapper(mapper, text[train], latents[train], args, bank)

    prior = MapperPrior(mapper, args.sigma, bank.weight.detach() if bank is not None else None)
    report = {"train_loss": losses[-1], **{f"heldout_{k}": v for k, v in mapper_report(prior, text[held, 0], latents[held]).items()}}
    if hasattr(dataset, "labels"):  # MNIST captions: held-out wordings of the held-out images' digits
        wordings = load_or_encode_text(encoder, [c for d in range(10) for c in digit_captions(d, "heldout")], codec.cache_dir)
        per_digit = wordings["pooled"].view(10, -1, encoder.dim)[:, 0].to(device)
        report["heldout_wording_mse"] = mapper_report(prior, per_digit[dataset.labels[items[held]].to(device)],
                                                      latents[held])["mse"]
    out = Path(args.output_dir)
    mapper.save_pretrained(out / "mapper")
    if bank is not None:
        bank_tensor = {"z": bank.weight.detach().cpu().contiguous()}
        atomic_write(out / "z_final.safetensors", lambda tmp: save_file(bank_tensor, tmp))
    write_json(out / "prior.json", dict(kind="text", sigma=args.sigma, dim_z=args.dim_z, text_encoder=args.text_encoder,
                                        codec=codec.fingerprint, latent_shape=list(codec.latent_shape),
                                        dataset=args.dataset, image_size=args.image_size, **report))
    print(json.dumps(report))
    print(f"text mapper saved to {out / 'mapper'}" + (f", code bank to {out / 'z_final.safetensors'}" if bank is not None else ""))
    return report


@cli_entry
def main(args: argparse.Namespace) -> dict:
    return fit_text_mapper(args) if args.condition == "text" else fit_class_prior(args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(parser)
    parser.add_argument("--vqvae_directory", "--vqae_directory", default=None,
                        help="saved VQ-VAE (diffusers VQModel); omit to work in pixel space")
    parser.add_argument("--output_dir", default="runs/prior-mnist")
    parser.add_argument("--covariance", default="diag", choices=COVARIANCES,
                        help="class covariance: diag scales to 1000 classes x 1024 dims; full needs C*D*D floats")
    parser.add_argument("--rank", type=int, default=16, help="rank of the low-rank part (--covariance lowrank)")
    parser.add_argument("--shrinkage", type=float, default=0.05, help="blend of (trace/D) I into each covariance")
    text = parser.add_argument_group("text mapper (--condition text; defaults as in the paper)")
    text.add_argument("--text_encoder", "--clip_model_name", default="minilm",
                      help="minilm (shipped, offline) or a CLIP hub name / local folder")
    text.add_argument("--num_train_epochs", type=int, default=20)
    text.add_argument("--batch_size", type=int, default=256)
    text.add_argument("--learning_rate", type=float, default=1e-4)
    text.add_argument("--max_grad_norm", type=float, default=1.0)
    text.add_argument("--dim_z", type=int, default=0, help="> 0: the noise-projector variant with a learned code per image")
    text.add_argument("--sigma", type=float, default=0.7, help="the text prior's noise scale")
    text.add_argument("--validation_fraction", type=float, default=0.05, help="images held out for the MSE report")
    text.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
