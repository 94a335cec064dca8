"""Shared fixtures: tiny models and data so the suite runs on two CPU cores."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers import VQModel  # noqa: E402
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer  # noqa: E402

TINY_VQVAE = dict(
    in_channels=1, out_channels=1, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[8, 8], layers_per_block=1, latent_channels=4, sample_size=16, num_vq_embeddings=16,
    norm_num_groups=4, scaling_factor=2.0,
)
TINY_UNET = dict(block_out_channels=[16, 16], norm_num_groups=8, attention_head_dim=8, layers_per_block=1)


@pytest.fixture(scope="session")
def vqvae_dir(tmp_path_factory) -> Path:
    """A randomly initialised 16px VQ-VAE with 4x8x8 latents, saved with save_pretrained."""
    directory = tmp_path_factory.mktemp("vqvae")
    torch.manual_seed(0)
    VQModel(**TINY_VQVAE).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def unet_config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "unet.json"
    path.write_text(json.dumps(TINY_UNET))
    return path


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A randomly initialised CLIP (text and vision towers, 16px images) with a tokenizer and
    processor built in memory, saved as a local folder: no hub access."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in ["a", "digit", "seven", "the", "number", "three", "handwritten"]:
        vocab[w + "</w>"] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789,":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=24, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, **tower),
        vision_config=dict(image_size=16, patch_size=8, **tower), projection_dim=8)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(directory)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def run_script(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run one of the project's scripts in a fresh interpreter, as a user would."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit status 2, one error line on stderr naming the problem, and no traceback.

    Our own errors read `error: ...`; argparse's read `script.py: error: ...` after its usage line.
    """
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [l for l in result.stderr.strip().splitlines() if "error:" in l]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
