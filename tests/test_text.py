"""Text conditioning: encoders, captions and their cache, the mapper prior, the text flow end to end."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import latent_cache
import metrics
import sample
import train
import train_mapper
from conftest import assert_clean_error, run_script
from dataset import MNIST_TEMPLATES, build_dataset, digit_captions
from flow import MapperPrior
from neural_models import TextMapper, load_text_encoder
from training_utils import UserError

def test_tiny_clip_gives_pooled_states_and_mask(tiny_clip_dir):
    encoder = load_text_encoder(str(tiny_clip_dir))
    out = encoder(["a digit seven", "three"])
    assert encoder.is_clip and encoder.dim == 16
    assert out["states"].shape == (2, 24, 16) and out["mask"].shape == (2, 24) and out["pooled"].shape == (2, 16)
    lengths = out["mask"].sum(1)
    assert lengths[0] > lengths[1] > 2  # start, the caption's tokens, end; padding masked out
    for i, n in enumerate(lengths.tolist()):  # pooled at the end-of-text token
        assert torch.allclose(out["pooled"][i], out["states"][i, n - 1], atol=1e-5)


def test_minilm_loads_from_the_installed_package():
    encoder = load_text_encoder("minilm")
    out = encoder(["the number seven", "a handwritten digit 7", "a photo of a cat on a sofa"])
    assert encoder.dim == 384 and torch.allclose(out["pooled"].norm(dim=1), torch.ones(3), atol=1e-4)
    sim = out["pooled"] @ out["pooled"].T
    assert sim[0, 1] > sim[0, 2]  # a real pretrained encoder: paraphrases are closer than unrelated text


def test_an_offline_hub_name_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="offline"):
        load_text_encoder("openai/clip-vit-base-patch32")
    result = run_script("train_mapper.py", "--condition", "text", "--text_encoder", "openai/clip-vit-base-patch32",
                        "--image_size", "16", "--max_train_samples", "32", "--output_dir", str(tmp_path))
    assert_clean_error(result, "openai/clip-vit-base-patch32", "local")


def test_caption_embeddings_are_cached_per_encoder_and_caption_list(tiny_clip_dir, tmp_path):
    encoder = load_text_encoder(str(tiny_clip_dir))
    calls = []
    counted = lambda captions: calls.append(len(captions)) or encoder(captions)  # noqa: E731
    counted.name = encoder.name
    first = latent_cache.load_or_encode_text(counted, ["", "a digit seven"], tmp_path)
    again = latent_cache.load_or_encode_text(counted, ["", "a digit seven"], tmp_path)
    assert calls == [2] and all(torch.equal(first[k], again[k]) for k in first)
    latent_cache.load_or_encode_text(counted, ["", "three"], tmp_path)
    assert calls == [2, 2]


def test_caption_table_puts_the_empty_caption_first_and_dedups():
    captions, ids, spans = latent_cache.caption_table([["a", "b"], ["b"], ["c", "a", "d"]])
    assert captions == ["", "a", "b", "c", "d"]
    assert [captions[i] for i in ids[spans[2, 0]:spans[2, 0] + spans[2, 1]]] == ["c", "a", "d"]


def test_mnist_captions_come_from_the_labels_with_held_out_wordings():
    ds = build_dataset("mnist", "train", image_size=16, max_samples=20, condition="text")
    image, caption = ds[0]
    digit = int(ds.labels[0])
    assert caption in digit_captions(digit) and ds.captions[0] == digit_captions(digit)
    assert not set(digit_captions(digit, "heldout")) & set(digit_captions(digit))
    assert len(MNIST_TEMPLATES["heldout"]) >= 2


@pytest.mark.parametrize("layout", ["metadata", "txt"])
def test_caption_folder_reads_jsonl_or_sibling_txt(tmp_path, layout):
    from PIL import Image

    for name in ("a", "b"):
        Image.new("RGB", (10, 10), (0, 200, 0)).save(tmp_path / f"{name}.png")
    if layout == "metadata":
        rows = [{"file_name": "a.png", "text": "green"}, {"file_name": "b.png", "text": "also green"},
                {"file_name": "a.png", "text": "a green square"}]
        (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    else:
        (tmp_path / "a.txt").write_text("green\na green square\n")
        (tmp_path / "b.txt").write_text("also green\n")
    ds = build_dataset("captionfolder", "train", str(tmp_path), image_size=8)
    assert len(ds) == 2 and sorted(map(sorted, ds.captions)) == [["a green square", "green"], ["also green"]]
    assert ds[0][0].shape == (3, 8, 8) and isinstance(ds[0][1], str)


def test_mapper_learns_a_known_linear_map():
    torch.manual_seed(0)
    text = torch.randn(512, 1, 8)
    a = torch.randn(8, 4 * 4 * 4) / 8**0.5
    latents = (text[:, 0] @ a).view(-1, 4, 4, 4)
    mapper = TextMapper(8, (4, 4, 4))
    args = train_mapper.parse_args(["--num_train_epochs", "150", "--batch_size", "64", "--learning_rate", "3e-3"])
    losses = train_mapper.train_text_mapper(mapper, text, latents, args)
    with torch.no_grad():
        test = torch.randn(256, 8)
        err = torch.nn.functional.mse_loss(mapper(test), (test @ a).view(-1, 4, 4, 4)).item()
    assert losses[-1] < 0.05 * latents.var().item() and err < 0.15 * latents.var().item()


TEXT_DATA = ["--condition", "text", "--image_size", "16", "--max_train_samples", "64"]


@pytest.fixture(scope="module")
def mapper_dir(vqvae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mapper")
    report = train_mapper.main(train_mapper.parse_args([*TEXT_DATA, "--vqvae_directory", str(vqvae_dir), "--output_dir", str(out),
                                                        "--num_train_epochs", "2", "--batch_size", "16", "--dim_z", "3"]))
    assert np.isfinite(report["heldout_mse"]) and np.isfinite(report["heldout_wording_mse"])
    return out


def test_the_dim_z_bank_is_saved_and_sampled(mapper_dir):
    bank = load_file(mapper_dir / "z_final.safetensors")["z"]
    assert bank.shape == (61, 3)  # the 64 images less the 5% held out
    prior = MapperPrior.load(mapper_dir)
    assert prior.sigma == 0.7 and torch.allclose(prior.z_mean, bank.mean(0)) and torch.allclose(prior.z_std, bank.std(0))
    torch.manual_seed(0)
    z = prior.draw_z(20000, "cpu")
    assert torch.allclose(z.mean(0), bank.mean(0), atol=0.02) and torch.allclose(z.std(0), bank.std(0), rtol=0.05)
    x0 = prior.sample(torch.randn(2, 384))
    assert x0.shape == (2, 4, 8, 8)


@pytest.mark.parametrize("method", ["cpd", "condot"])
def test_text_training_sampling_and_scoring_end_to_end(method, vqvae_dir, unet_config_file, mapper_dir, tiny_clip_dir,
                                                       tmp_path):
    run = tmp_path / "run"
    args = [*TEXT_DATA, "--method", method, "--vqvae_directory", str(vqvae_dir), "--output_dir", str(run),
            "--unet_config", str(unet_config_file), "--batch_size", "16", "--max_steps", "3", "--validation_steps", "3",
            "--num_steps", "2", "--cfg_dropout", "0.5"]
    if method == "cpd":
        args += ["--prior_dir", str(mapper_dir)]
    train.main(train.parse_args(args))
    config = json.loads((run / "config.json").read_text())
    assert config["condition"] == "text" and config["unet"]["cross_attention_dim"] == 384 and config["sigma"] == 0.7
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the number seven\ndigit 3, drawn in ink\n")
    out = tmp_path / "samples"
    summary = sample.main(sample.parse_args(["--run_dir", str(run), "--prompts_file", str(prompts), "--samples_per_prompt", "2",
                                             "--nfe", "2", "--cfg_scale", "2", "--output_dir", str(out)]))
    npz = np.load(out / "samples.npz")
    assert summary["nfe"] == 2 and npz["images"].shape == (4, 16, 16, 1)
    assert npz["prompts"].tolist() == ["the number seven"] * 2 + ["digit 3, drawn in ink"] * 2
    result = metrics.main(metrics.parse_args([
        "evaluate", "--run_dir", str(run), "--num_samples", "4", "--num_real", "4", "--nfe", "2", "--cfg_scale", "2",
        "--clip_model", str(tiny_clip_dir), "--cache_dir", str(tmp_path / "refs")]))
    for wording in ("seen", "heldout"):  # the held-out wordings are scored on their own
        assert result[wording]["num_fake"] == 4 and 0 <= result[wording]["clip_score"] <= 100


def test_the_paper_flags_point_the_prior_at_other_mapper_and_bank_files(mapper_dir, tmp_path):
    import shutil

    moved = tmp_path / "elsewhere"
    shutil.copytree(mapper_dir / "mapper", moved / "projector")
    bank = load_file(mapper_dir / "z_final.safetensors")["z"]
    from safetensors.torch import save_file

    save_file({"z": bank * 10}, moved / "z.safetensors")
    (tmp_path / "p").mkdir()
    shutil.copy(mapper_dir / "prior.json", tmp_path / "p" / "prior.json")
    with pytest.raises(UserError, match="bank"):
        MapperPrior.load(tmp_path / "p", mapper_path=str(moved / "projector"))
    prior = MapperPrior.load(tmp_path / "p", mapper_path=str(moved / "projector"), z_path=str(moved / "z.safetensors"))
    assert torch.allclose(prior.z_mean, 10 * bank.mean(0))
