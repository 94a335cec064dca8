import argparse
import json
import shutil

import pytest
import torch
from diffusers import VQModel

import latent_cache
import train_vqvae
from dataset import build_dataset
from neural_models import PixelCodec, VQVAECodec, load_codec
from training_utils import UserError


def test_codec_encodes_scaled_latents_and_decodes_images(vqvae_dir):
    codec = load_codec(str(vqvae_dir), channels=1, image_size=16)
    assert codec.latent_shape == (4, 8, 8)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    z = codec.encode(x)
    raw = codec.vqvae.encode(x).latents
    assert z.shape == (3, 4, 8, 8) and torch.allclose(z, raw * 2.0)  # scaling_factor 2 from the config
    images = codec.decode(z)
    assert images.shape == x.shape and images.min() >= -1 and images.max() <= 1
    # decode undoes the scaling before the VQ-VAE sees the latents
    expected = codec.vqvae.decode(raw).sample.clamp(-1, 1)
    assert torch.allclose(images, expected, atol=1e-5)


def test_codec_rejects_a_vqvae_for_other_images(vqvae_dir, tmp_path):
    with pytest.raises(UserError, match="1x16px"):
        load_codec(str(vqvae_dir), channels=3, image_size=16)
    with pytest.raises(UserError, match="no VQ-VAE"):
        load_codec(str(tmp_path), channels=1, image_size=16)


def test_pixel_codec_is_the_identity():
    codec = PixelCodec(1, 16)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert codec.latent_shape == (1, 16, 16) and torch.equal(codec.decode(codec.encode(x)), x)


def test_train_vqvae_saves_a_loadable_model_with_a_report(tmp_path):
    out = tmp_path / "vq"
    report = train_vqvae.main(train_vqvae.parse_args([
        "--image_size", "16", "--max_train_samples", "64", "--max_steps", "3", "--batch_size", "16",
        "--output_dir", str(out)]))
    model = VQModel.from_pretrained(out)
    assert model.config.sample_size == 16 and model.config.scaling_factor > 0
    saved = json.loads((out / "report.json").read_text())
    assert saved["test_psnr"] == pytest.approx(report["test_psnr"]) and saved["latent_shape"] == [4, 4, 4]
    assert (out / "reconstructions.png").stat().st_size > 0


def cache_args(**kw):
    base = dict(dataset="mnist", data_dir=None, image_size=16, max_train_samples=40, condition="class")
    return argparse.Namespace(**{**base, **kw})


def test_latent_cache_is_reused_and_invalidated(vqvae_dir, tmp_path, monkeypatch):
    vqvae_dir = shutil.copytree(vqvae_dir, tmp_path / "vq")  # this test retrains it
    codec = VQVAECodec(VQModel.from_pretrained(vqvae_dir), vqvae_dir)
    calls = []
    real_encode = latent_cache.encode_dataset
    monkeypatch.setattr(latent_cache, "encode_dataset", lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    build = lambda args: lambda: build_dataset("mnist", "train", None, 16, args.max_train_samples)  # noqa: E731
    args = cache_args()
    z1, y1 = latent_cache.load_or_encode(codec, build(args), args, "train", torch.device("cpu"))
    z2, y2 = latent_cache.load_or_encode(codec, build(args), args, "train", torch.device("cpu"))
    assert len(calls) == 1 and torch.equal(z1, z2) and torch.equal(y1, y2) and z1.shape == (40, 4, 8, 8)
    assert torch.allclose(z1[:4], codec.encode(torch.stack([build(args)()[i][0] for i in range(4)])), atol=1e-5)

    other = cache_args(max_train_samples=30)  # a changed input builds a new cache
    z3, _ = latent_cache.load_or_encode(codec, build(other), other, "train", torch.device("cpu"))
    assert len(calls) == 2 and len(z3) == 30

    # New VQ-VAE weights in the same folder: the old cache must not be read.
    with torch.no_grad():
        codec.vqvae.encoder.conv_in.weight.mul_(2)
    codec.vqvae.save_pretrained(vqvae_dir)
    retrained = VQVAECodec(VQModel.from_pretrained(vqvae_dir), vqvae_dir)
    z4, _ = latent_cache.load_or_encode(retrained, build(args), args, "train", torch.device("cpu"))
    assert len(calls) == 3 and not torch.allclose(z4, z1)
