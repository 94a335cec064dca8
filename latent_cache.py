"""Encode once, read many times: image latents next to the VQ-VAE, and caption embeddings.

The file name carries a hash of everything the latents depend on (dataset, data folder, split,
image size, sample count, VQ-VAE weights), and the same key is stored inside the file and
checked on load, so a changed input always rebuilds and a stale cache is never read.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from training_utils import all_gather_rows, atomic_write


def cache_key(args, split: str, codec) -> dict:
    return dict(
        dataset=args.dataset,
        data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else None,
        split=split,
        condition=args.condition,  # the labels are classes, or item indices for captions
        image_size=args.image_size,
        max_samples=args.max_train_samples if split == "train" else None,
        codec=codec.fingerprint,
    )


def cache_path(codec, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return codec.cache_dir / f"{key['dataset']}-{key['split']}-{key['image_size']}px-{digest}.safetensors"


@torch.no_grad()
def encode_dataset(codec, dataset, device: torch.device, batch_size: int = 256, rank: int = 0,
                   world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (N, *latent_shape) and labels (N,) of a dataset, in order (for a captioned
    dataset the "labels" are the item indices).

    Under torchrun each rank encodes a contiguous shard and every rank gets the whole result.
    """
    codec.to(device)
    shard = -(-len(dataset) // world)
    part = Subset(dataset, range(rank * shard, min(len(dataset), (rank + 1) * shard)))
    latents, labels = [], []
    loader = DataLoader(part, batch_size=batch_size)
    for b, (images, y) in enumerate(tqdm(loader, desc="encoding latents", disable=rank > 0)):
        latents.append(codec.encode(images.to(device)).float())
        if isinstance(y, (list, tuple)):  # captions: keep each item's index instead
            y = torch.arange(len(images)) + part.indices[0] + b * batch_size
        labels.append(torch.as_tensor(y, device=device))
    latents, labels = torch.cat(latents), torch.cat(labels).long()
    return all_gather_rows(latents, world).cpu(), all_gather_rows(labels, world).cpu()


def load_or_encode(codec, dataset_fn, args, split: str, device: torch.device, rank: int = 0,
                   world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached latents and labels of a split; `dataset_fn()` builds the dataset only when needed.

    Pixel space (no cache directory) encodes in memory every time: it is just the images.
    Under torchrun the ranks share the encoding and rank 0 writes the cache.
    """
    if codec.cache_dir is None:
        return encode_dataset(codec, dataset_fn(), device, rank=rank, world=world)
    key = cache_key(args, split, codec)
    path = cache_path(codec, key)
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            if json.loads(f.metadata().get("key", "{}")) == key:
                return f.get_tensor("latents"), f.get_tensor("labels")
    latents, labels = encode_dataset(codec, dataset_fn(), device, rank=rank, world=world)
    if rank == 0:
        tensors = {"latents": latents.contiguous(), "labels": labels}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"key": json.dumps(key, sort_keys=True)}))
        print(f"cached {len(latents)} latents in {path}")
    return latents, labels


def caption_table(captions_per_item: list[list[str]]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(distinct captions, ids, spans): the empty caption, guidance's null condition, comes first;
    item i's captions are ids[spans[i, 0] : spans[i, 0] + spans[i, 1]]."""
    index = {"": 0}
    ids = [index.setdefault(c, len(index)) for caps in captions_per_item for c in caps]
    counts = torch.tensor([len(caps) for caps in captions_per_item])
    offsets = torch.cumsum(counts, 0) - counts
    return list(index), torch.tensor(ids), torch.stack([offsets, counts], 1)


@torch.no_grad()
def load_or_encode_text(encoder, captions: list[str], cache_dir: Path | None, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """pooled / states / mask of each distinct caption, computed once per encoder and caption list."""
    key = json.dumps({"encoder": encoder.name, "captions": captions})
    path = cache_dir / f"text-{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        with safe_open(str(path), "pt") as f:
            if f.metadata().get("key") == key:
                return {k: f.get_tensor(k) for k in ("pooled", "states", "mask")}
    parts = [encoder(captions[i:i + batch_size]) for i in tqdm(range(0, len(captions), batch_size), desc="encoding captions")]
    table = {k: torch.cat([p[k] for p in parts]).cpu().contiguous() for k in ("pooled", "states", "mask")}
    if path is not None:
        atomic_write(path, lambda tmp: save_file(table, tmp, metadata={"key": key}))
    return table
