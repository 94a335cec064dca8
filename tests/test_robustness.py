"""Scale-out and fault handling: torchrun, preemption, interrupted writes, NaN losses."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import train
from checkpoints import list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from conftest import ROOT, assert_clean_error, run_script
from training_utils import UserError

DATA = ["--image_size", "16", "--max_train_samples", "64"]


def base_train(vqvae_dir, unet_config_file, out, *extra):
    return [*DATA, "--method", "condot", "--vqvae_directory", str(vqvae_dir), "--unet_config", str(unet_config_file),
            "--batch_size", "8", "--validation_steps", "0", "--logging_steps", "1", "--output_dir", str(out), *extra]


def torchrun(*argv):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *argv]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_two_process_torchrun_fits_the_same_prior_and_trains(vqvae_dir, unet_config_file, tmp_path):
    vq = shutil.copytree(vqvae_dir, tmp_path / "vq")  # its own latent cache, so both runs encode
    single, double = tmp_path / "p1", tmp_path / "p2"
    mapper = ["train_mapper.py", *DATA, "--vqvae_directory", str(vq), "--covariance", "full"]
    assert run_script(*mapper, "--output_dir", str(single)).returncode == 0
    shutil.rmtree(vq / "latent_cache")
    result = torchrun(*mapper, "--output_dir", str(double))
    assert result.returncode == 0, result.stderr[-2000:]
    a, b = load_file(single / "prior.safetensors"), load_file(double / "prior.safetensors")
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key

    run = tmp_path / "ddp"
    result = torchrun("train.py", *base_train(vq, unet_config_file, run, "--max_steps", "3",
                                              "--checkpointing_steps", "10", "--method", "batchot", "--ot_global"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-00000003.pt"]
    state = load_checkpoint(list_checkpoints(run)[0])
    assert state["step"] == 3 and len(state["rng"]) == 2
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3  # rank 0 logs alone


def test_sigterm_checkpoints_and_the_run_resumes(vqvae_dir, unet_config_file, tmp_path):
    run = tmp_path / "run"
    args = base_train(vqvae_dir, unet_config_file, run, "--max_steps", "100000", "--checkpointing_steps", "100000")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM received" in out
    (path,) = list_checkpoints(run)
    step = load_checkpoint(path)["step"]
    assert step >= 1
    result = train.main(train.parse_args(base_train(vqvae_dir, unet_config_file, run, "--max_steps", str(step + 2),
                                                    "--resume_from_checkpoint", "latest")))
    assert result["step"] == step + 2 and (run / "unet" / "config.json").is_file()


def test_an_interrupted_checkpoint_write_is_never_picked(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, {"step": 1}, 1)

    def dies_mid_write(obj, path):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process is stopped part-way through the write

    monkeypatch.setattr(checkpoints.torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, {"step": 2}, 2)
    # A SIGKILL would leave its temporary file behind: it is not a checkpoint either.
    (tmp_path / "checkpoints" / ".checkpoint-00000003.pt.abc.tmp").write_bytes(b"partial")
    assert resolve_checkpoint(tmp_path, "latest").name == "checkpoint-00000001.pt"
    assert load_checkpoint(resolve_checkpoint(tmp_path, "latest"))["step"] == 1


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint-00000001.pt"
    path.write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(path)


def test_a_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(vqvae_dir, unet_config_file, tmp_path, monkeypatch):
    real_loss, calls = train.training_loss, []

    def poisoned(*args, **kwargs):
        loss, cost = real_loss(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), cost

    monkeypatch.setattr(train, "training_loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train.main(train.parse_args(base_train(vqvae_dir, unet_config_file, run, "--max_steps", "5",
                                               "--checkpointing_steps", "2")))
    assert exit_info.value.code == 2
    (path,) = list_checkpoints(run)
    state = load_checkpoint(path)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["unet"].values())


@pytest.mark.parametrize("case, fragments", [
    ("missing_data", ["data folder not found"]),
    ("unreadable_image", ["unreadable image"]),
    ("unknown_solver", ["invalid choice", "leapfrog"]),
    ("nonpositive_nfe", ["--nfe must be positive"]),
])
def test_bad_input_table(case, fragments, vqvae_dir, unet_config_file, tmp_path):
    if case == "missing_data":
        result = run_script("train.py", "--dataset", "imagefolder", "--data_dir", str(tmp_path / "none"),
                            "--method", "condot")
    elif case == "unreadable_image":
        (tmp_path / "train" / "a").mkdir(parents=True)
        (tmp_path / "train" / "a" / "broken.png").write_bytes(b"\x89PNG broken")
        result = run_script("train_mapper.py", "--dataset", "imagefolder", "--data_dir", str(tmp_path),
                            "--image_size", "8")
    else:
        run = tmp_path / "run"
        assert run_script("train.py", *base_train(vqvae_dir, unet_config_file, run, "--max_steps", "1")).returncode == 0
        nfe, solver = ("0", "euler") if case == "nonpositive_nfe" else ("4", "leapfrog")
        result = run_script("sample.py", "--run_dir", str(run), "--nfe", nfe, "--solver", solver)
    assert_clean_error(result, *fragments)
