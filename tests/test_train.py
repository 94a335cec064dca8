"""End to end through the command lines: fit the prior, train each method, sample, resume."""
import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

import sample
import train
import train_mapper
from checkpoints import list_checkpoints, load_checkpoint
from conftest import assert_clean_error, run_script

DATA = ["--image_size", "16", "--max_train_samples", "64"]


@pytest.fixture(scope="module")
def prior_dir(vqvae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prior")
    report = train_mapper.main(train_mapper.parse_args(
        [*DATA, "--vqvae_directory", str(vqvae_dir), "--output_dir", str(out), "--covariance", "diag"]))
    assert report["transport_cost_prior"] < report["transport_cost_standard_normal"]
    return out


def train_args(method, out, vqvae_dir, unet_config_file, prior_dir=None, *extra):
    args = [*DATA, "--method", method, "--vqvae_directory", str(vqvae_dir), "--output_dir", str(out),
            "--unet_config", str(unet_config_file), "--batch_size", "16", "--max_steps", "4", "--checkpointing_steps", "2",
            "--validation_steps", "4", "--num_steps", "2", "--logging_steps", "1", "--lr_warmup_steps", "1", *extra]
    if prior_dir:
        args += ["--prior_dir", str(prior_dir)]
    return train.parse_args(args)


@pytest.mark.parametrize("method", ["cpd", "condot", "batchot", "ddpm"])
def test_each_method_trains_and_samples_end_to_end(method, vqvae_dir, unet_config_file, prior_dir, tmp_path):
    run = tmp_path / method
    train.main(train_args(method, run, vqvae_dir, unet_config_file, prior_dir if method == "cpd" else None))
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == method and config["latent_shape"] == [4, 8, 8]
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    assert (run / "samples-00000004.png").is_file()
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-00000002.pt", "checkpoint-00000004.pt"]
    UNet2DModel.from_pretrained(run / "unet")  # diffusers loads the final EMA network

    out = tmp_path / "samples"
    summary = sample.main(sample.parse_args(["--run_dir", str(run), "--labels", "0,1,7", "--nfe", "3",
                                             "--solver", "midpoint", "--output_dir", str(out)]))
    assert summary["nfe"] == 3
    npz = np.load(out / "samples.npz")
    assert npz["images"].shape == (3, 16, 16, 1) and npz["images"].dtype == np.uint8
    assert npz["labels"].tolist() == [0, 1, 7] and npz["x0"].shape == npz["x1"].shape == (3, 4, 8, 8)
    assert (out / "grid.png").is_file() and (out / "00002-class7.png").is_file()


def test_cpd_prior_samples_start_near_their_class_mean(vqvae_dir, unet_config_file, prior_dir, tmp_path):
    run = tmp_path / "cpd"
    train.main(train_args("cpd", run, vqvae_dir, unet_config_file, prior_dir))
    out = tmp_path / "s"
    sample.main(sample.parse_args(["--run_dir", str(run), "--labels", "3,3,3,3", "--nfe", "1", "--output_dir", str(out)]))
    x0 = torch.from_numpy(np.load(out / "samples.npz")["x0"])
    from flow import ClassGaussianPrior

    means = ClassGaussianPrior.load(prior_dir).means
    dist = (x0[:, None] - means[None]).flatten(2).pow(2).sum(-1).mean(0)  # mean distance to each class mean
    assert dist.argmin().item() == 3


def test_resume_continues_from_the_saved_step_with_identical_weights(vqvae_dir, unet_config_file, tmp_path):
    straight = tmp_path / "straight"
    train.main(train_args("batchot", straight, vqvae_dir, unet_config_file))
    resumed = tmp_path / "resumed"
    train.main(train_args("batchot", resumed, vqvae_dir, unet_config_file, None, "--max_steps", "2"))
    result = train.main(train_args("batchot", resumed, vqvae_dir, unet_config_file, None,
                                   "--resume_from_checkpoint", "latest"))
    assert result["step"] == 4
    rows = [json.loads(l)["step"] for l in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4]
    a = load_checkpoint(list_checkpoints(straight)[-1])
    b = load_checkpoint(list_checkpoints(resumed)[-1])
    for key in a["unet"]:
        assert torch.equal(a["unet"][key], b["unet"][key]), key
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"]):
        assert torch.equal(x, y)


def cli(*argv):
    return run_script(*argv)


@pytest.mark.parametrize("case", ["existing_run", "unknown_label", "bad_solver_nfe", "foreign_prior", "mismatched_resume"])
def test_bad_input_ends_in_one_clear_line(case, vqvae_dir, unet_config_file, prior_dir, tmp_path):
    run = tmp_path / "run"
    base = ["train.py", *DATA, "--vqvae_directory", str(vqvae_dir), "--unet_config", str(unet_config_file),
            "--batch_size", "16", "--max_steps", "1", "--validation_steps", "0", "--output_dir", str(run)]
    if case in ("existing_run", "unknown_label", "bad_solver_nfe", "mismatched_resume"):
        assert cli(*base, "--method", "condot").returncode == 0
    if case == "existing_run":
        assert_clean_error(cli(*base, "--method", "condot"), "already holds a run")
    elif case == "unknown_label":
        assert_clean_error(cli("sample.py", "--run_dir", str(run), "--labels", "3,11"), "unknown class 11")
    elif case == "bad_solver_nfe":
        assert_clean_error(cli("sample.py", "--run_dir", str(run), "--nfe", "0"), "--nfe must be positive")
    elif case == "foreign_prior":
        other = tmp_path / "other-vq"
        import shutil

        shutil.copytree(vqvae_dir, other)
        cfg = json.loads((other / "config.json").read_text())
        (other / "config.json").write_text(json.dumps({**cfg, "scaling_factor": 3.0}))
        result = cli(*[a if a != str(vqvae_dir) else str(other) for a in base], "--method", "cpd",
                     "--prior_dir", str(prior_dir))
        assert_clean_error(result, "fitted to another latent space")
    else:
        assert_clean_error(cli(*base, "--method", "ddpm", "--resume_from_checkpoint", "latest"), "method")
