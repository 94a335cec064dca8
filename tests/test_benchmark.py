"""benchmark.py: the speed figures and the comparison pipeline, end to end at toy sizes."""
import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch

import benchmark
from dataset import digit_captions
from runs import METHODS

PNG = b"\x89PNG\r\n\x1a\n"


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_presets_are_consistent():
    for name, p in benchmark.PRESETS.items():
        assert set(p.fid_nfes) <= set(benchmark.NFES), name
        # the headline point, the FID-vs-step curve's last point and the curves share 15 NFE euler
        assert benchmark.HEADLINE_NFE in p.fid_nfes and "euler" in p.fid_solvers, name
        assert p.train_steps % p.checkpoints == 0, name
        assert p.curve_samples <= p.fid_samples and p.eval_samples <= p.fid_samples, name


def test_compare_toy_writes_every_figure_and_reuses_finished_stages(vqvae_dir, tmp_path, capsys):
    out = tmp_path / "comparison"
    argv = ["compare", "--preset", "toy", "--output_dir", str(out), "--vqvae_directory", str(vqvae_dir),
            "--fid_cache_dir", str(tmp_path / "fid_refs"), "--covariance", "isotropic"]
    benchmark.main(benchmark.parse_args(argv))
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["covariance"] == json.loads((out / "prior" / "prior.json").read_text())["covariance"] == "isotropic"
    assert set(saved["methods"]) == {"cpd", "condot", "batchot", "ddpm"}
    for method, r in saved["methods"].items():
        head = r["headline"]
        assert all(finite(head[k]) for k in ("fid", "kid", "accuracy", "transport_cost")), (method, head)
        assert 0 <= head["accuracy"] <= 1 and head["transport_cost"] > 0
        assert (head["nfe"], head["solver"]) == (15, "ddim" if method == "ddpm" else "euler")
        points = {(e["nfe"], e["solver"]) for e in r["evaluations"]}
        assert points == {(n, s) for n in benchmark.NFES for s in benchmark.solvers_of(method)}
        assert all(e["nfe_used"] == e["nfe"] and finite(e["transport_cost"]) for e in r["evaluations"])
        # FID along training: the intermediate checkpoint's EMA, then the final network
        assert [p["step"] for p in r["fid_vs_step"]] == [2, 4]
        assert all(finite(p["fid"]) for p in r["fid_vs_step"])
        assert r["fid_vs_step"][-1]["fid"] == head["fid"]  # toy: curve and headline use the same samples
    assert saved["settings"]["seed"] == 0 and saved["machine"]["cpu_count"] >= 1 and saved["torch"] == torch.__version__
    assert saved["command"].startswith("python benchmark.py compare --preset toy")
    md = (out / "results.md").read_text()
    assert "| method | FID | KID (x100) | accuracy | transport cost |" in md
    assert all(f"| {m} |" in md for m in saved["methods"])
    for png in ("fid_vs_nfe.png", "fid_vs_step.png", "grids.png"):
        assert (out / png).read_bytes()[:8] == PNG, png

    # A second run reuses every finished stage (nothing is retrained) and reports the same figures.
    trained = {m: (out / "runs" / m / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns for m in METHODS}
    again = benchmark.main(benchmark.parse_args([*argv, "--skip_existing"]))
    assert all(again["methods"][m]["train"]["reused"] for m in METHODS)
    assert {m: (out / "runs" / m / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns for m in METHODS} == trained
    assert again["methods"]["cpd"]["headline"] == saved["methods"]["cpd"]["headline"]

    # Without --skip_existing a used folder is refused with one clear line.
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(benchmark.parse_args(argv))
    assert exit_info.value.code == 2
    assert "--skip_existing" in capsys.readouterr().err


def test_speed_reports_every_figure(unet_config_file, tmp_path, capsys):
    output = tmp_path / "speed.json"
    benchmark.main(benchmark.parse_args([
        "speed", "--batch_size", "8", "--repeats", "2", "--ot_batch_sizes", "8,16", "--nfes", "1,2",
        "--sample_batch_size", "4", "--sample_repeats", "1", "--unet_config", str(unet_config_file), "--output", str(output)]))
    saved = json.loads(output.read_text())
    assert set(saved["training_step"]) == {"bare", *METHODS}
    for name, row in saved["training_step"].items():
        assert row["median_ms"] > 0 and finite(row["overhead_pct"]), name
    assert saved["training_step"]["bare"]["overhead_pct"] == 0
    assert [r["batch"] for r in saved["coupling"]] == [8, 16]
    assert all(r["ours_duplicate_x0"] == 0 and r["ours_ms"] > 0 for r in saved["coupling"])
    assert [r["nfe"] for r in saved["sampling"]] == [1, 2]
    assert all(finite(r["euler_ratio"]) and finite(r["ddim_ratio"]) and r["forward_ms"] > 0 for r in saved["sampling"])
    assert set(saved["memory"]["mib"]) == {*(f"train_step_{n}" for n in ("bare", *METHODS)), "sampling_nfe2_batch4"}
    assert all(v is None or v >= 0 for v in saved["memory"]["mib"].values()) and saved["memory"]["kind"]
    assert saved["command"].startswith("python benchmark.py speed") and saved["torch"] == torch.__version__
    assert {"platform", "cpu_count", "load_average"} <= set(saved["machine"])
    printed = capsys.readouterr().out
    assert "| bare |" in printed and "| 16 |" in printed


def test_coupling_without_pot_or_torchcfm_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ot", None)  # import now raises ImportError
    monkeypatch.setitem(sys.modules, "torchcfm.conditional_flow_matching", None)
    args = benchmark.parse_args(["speed", "--repeats", "1", "--ot_batch_sizes", "8"])
    [row] = benchmark.time_coupling(SimpleNamespace(latent_shape=(4, 2, 2)), args, torch.device("cpu"))
    assert row["ours_ms"] > 0 and row["pot_emd_ms"] is None and row["torchcfm_duplicate_x0"] is None
    assert "pip install pot torchcfm" in capsys.readouterr().out


def test_torchcfm_pairs_are_drawn_with_replacement():
    pytest.importorskip("torchcfm")
    args = benchmark.parse_args(["speed", "--repeats", "3", "--ot_batch_sizes", "64"])
    [row] = benchmark.time_coupling(SimpleNamespace(latent_shape=(4, 2, 2)), args, torch.device("cpu"))
    # 64 draws from 64 equally likely pairs leave about 23 duplicates; ours is a permutation
    assert row["ours_duplicate_x0"] == 0 and row["torchcfm_duplicate_x0"] > 5
    assert row["pot_emd_ms"] > 0


def test_caption_prompts_pair_seen_and_held_out_wordings_of_each_digit():
    prompts, digits, heldout = benchmark.caption_prompts(40)
    assert digits.tolist() == [i // 2 % 10 for i in range(40)] and heldout.tolist() == [False, True] * 20
    for prompt, digit, held in zip(prompts, digits.tolist(), heldout.tolist()):
        assert prompt in digit_captions(digit, "heldout" if held else "train")
    assert len(set(prompts)) == 40  # the second 20 use the next template of each wording


def test_compare_text_toy_scores_seen_and_held_out_wordings(vqvae_dir, tmp_path):
    out = tmp_path / "text"
    benchmark.main(benchmark.parse_args([
        "compare", "--preset", "toy", "--variant", "text", "--output_dir", str(out),
        "--vqvae_directory", str(vqvae_dir), "--fid_cache_dir", str(tmp_path / "fid_refs")]))
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["methods"]) == {"cpd", "condot"} and finite(saved["prior"]["heldout_wording_mse"])
    assert saved["settings"]["variant"] == "text"
    for method, r in saved["methods"].items():
        run = json.loads((out / "runs" / method / "config.json").read_text())
        assert run["condition"] == "text" and run["method"] == method
        head = r["headline"]
        assert all(finite(head[k]) for k in ("fid", "accuracy", "accuracy_seen", "accuracy_heldout", "transport_cost"))
        assert head["accuracy"] == pytest.approx((head["accuracy_seen"] + head["accuracy_heldout"]) / 2)
    md = (out / "results.md").read_text()
    assert "| method | FID | KID (x100) | accuracy | accuracy_seen | accuracy_heldout | transport cost |" in md
    assert (out / "grids.png").read_bytes()[:8] == PNG
