import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_clean_error, run_script
from dataset import DataError, build_dataset


def test_mnist_has_the_standard_splits_and_labels():
    train, test = build_dataset("mnist", "train"), build_dataset("mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert sorted(train.labels.unique().tolist()) == list(range(10))
    image, label = train[0]
    assert image.shape == (1, 32, 32) and 0 <= label <= 9
    assert image.min() == -1.0 and image.max() == 1.0
    assert train.num_classes == 10 and train.channels == 1


def test_mnist_resizes_and_truncates_reproducibly():
    a = build_dataset("mnist", "train", image_size=16, max_samples=100, seed=3)
    b = build_dataset("mnist", "train", image_size=16, max_samples=100, seed=3)
    assert len(a) == 100 and a[0][0].shape == (1, 16, 16)
    assert torch.equal(a.labels, b.labels) and len(a.labels.unique()) > 5  # a random subset, not the first rows


def write_png(path, size=(20, 24), color=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_imagefolder_reads_one_class_per_folder(tmp_path):
    for cls in ("cat", "dog"):
        for i in range(3):
            write_png(tmp_path / "train" / cls / f"{i}.png")
    ds = build_dataset("imagefolder", "train", str(tmp_path), image_size=8)
    assert len(ds) == 6 and ds.num_classes == 2 and ds.classes == ["cat", "dog"]
    image, label = ds[5]
    assert image.shape == (3, 8, 8) and label == 1
    assert image[0].mean() == pytest.approx(200 / 127.5 - 1, abs=1e-2)


def test_imagenet64_reads_official_batches_and_shifts_labels(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (5, 12288), dtype=np.uint8)
    np.savez(tmp_path / "train_data_batch_1.npz", data=data, labels=np.array([1, 2, 3, 1000, 5]))
    ds = build_dataset("imagenet64", "train", str(tmp_path), image_size=64)
    image, label = ds[3]
    assert len(ds) == 5 and label == 999 and ds.num_classes == 1000
    expected = torch.from_numpy(data[3].reshape(3, 64, 64)).float() / 127.5 - 1
    assert torch.allclose(image, expected)


def write_coco(root, captions=None):
    write_png(root / "train2017" / "a.png")
    meta = {"images": [{"id": 1, "file_name": "a.png"}],
            "annotations": [{"image_id": 1, "caption": c} for c in (captions or ["a red square", "red"])]}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps(meta))


def test_coco_yields_images_with_one_of_their_captions(tmp_path):
    write_coco(tmp_path)
    ds = build_dataset("coco", "train", str(tmp_path), image_size=16)
    seen = {ds[0][1] for _ in range(40)}
    assert seen == {"a red square", "red"} and ds[0][0].shape == (3, 16, 16)
    assert ds.conditioning == "text"


@pytest.mark.parametrize("case, fragment", [
    ("missing", "not found"),
    ("empty", "no images"),
    ("unreadable", "unreadable image"),
    ("bad_json", "malformed COCO"),
    ("bad_npz", "malformed ImageNet-64"),
])
def test_bad_data_raises_a_clear_error(tmp_path, case, fragment):
    if case == "missing":
        name, root = "imagefolder", tmp_path / "nope"
    elif case == "empty":
        name, root = "imagefolder", tmp_path
        (tmp_path / "train" / "cls").mkdir(parents=True)
    elif case == "unreadable":
        name, root = "imagefolder", tmp_path
        (tmp_path / "train" / "cls").mkdir(parents=True)
        (tmp_path / "train" / "cls" / "x.png").write_bytes(b"not a png")
    elif case == "bad_json":
        name, root = "coco", tmp_path
        write_coco(tmp_path)
        (tmp_path / "annotations" / "captions_train2017.json").write_text("{oops")
    else:
        name, root = "imagenet64", tmp_path
        np.savez(tmp_path / "train_data_batch_1.npz", data=np.zeros((2, 10), np.uint8), labels=np.ones(2))
    with pytest.raises(DataError, match=fragment) as err:
        ds = build_dataset(name, "train", str(root), image_size=8)
        ds[0]
    assert str(root) in str(err.value)


def test_a_script_reports_bad_data_in_one_line(tmp_path):
    result = run_script("train_vqvae.py", "--dataset", "imagefolder", "--data_dir", str(tmp_path / "missing"))
    assert_clean_error(result, "data folder not found", str(tmp_path / "missing"))
