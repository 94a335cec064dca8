"""Benchmarks: what each method costs per training step and per sample, and the paper's comparison.

    python benchmark.py speed --output docs/speed.json
    python benchmark.py compare --preset quick --output_dir runs/benchmark
    python benchmark.py compare --preset quick --variant text --output_dir runs/benchmark-text

speed    one process, everything timed side by side (round-robin, medians): a training step of
         each method (train.py's loss path) against a bare UNet forward + backward + AdamW step on
         the same batch and network; our exact BatchOT coupling against POT's ot.emd and torchcfm's
         ExactOptimalTransportConditionalFlowMatcher (optional: `pip install pot torchcfm`),
         with the duplicated pairs torchcfm's sampling with replacement makes; sampling at NFE
         1..15 against NFE x one bare forward pass; peak memory of a training step and of
         sampling. Prints markdown tables and writes a JSON of every figure.
compare  the paper's comparison on MNIST through the project's own CLIs: train (or reuse) the
         VQ-VAE, fit the prior, train every method with one network, budget and seed, and
         evaluate each at NFE 1..60 with euler and midpoint (ddpm: DDIM): FID/KID against the
         MNIST test split, classifier accuracy, transport cost, and FID at 15 NFE along training.
         `--variant class` (default): cpd, condot, batchot and ddpm on the digit classes;
         `--variant text`: cpd (text mapper prior) against condot on captions made from the
         labels, with accuracy on the training wordings and on held-out ones. Writes
         results.json, results.md, fid_vs_nfe.png, fid_vs_step.png and grids.png in --output_dir.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import metrics
import train
import train_mapper
import train_vqvae
from checkpoints import checkpoint_step, list_checkpoints
from dataset import digit_captions
from flow import COVARIANCES, TIME_SCALE, ClassGaussianPrior, couple, generate, ot_permutation, transport_cost
from neural_models import PixelCodec, build_unet, conditional_model
from runs import METHODS, ClassConditioning, build_prior, load_run, sampling_scheduler, training_scheduler
from sample import labelled_grid, sample_run
from training_utils import UserError, autocast, cli_entry, pick_device, read_json, seed_everything, write_json

ROOT = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict:
    info = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                python=platform.python_version(), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), device=str(device), load_average=list(os.getloadavg()))
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                        warmup: int = 2) -> dict[str, float]:
    """Median seconds of each fn, timed round-robin so that a change in machine load hits all alike;
    the order rotates every round, so no fn always runs first (or after the same neighbour)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def optional_module(name: str):
    """A peer library that is not a project requirement, or None with a note on how to get it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        print(f"{name} is not installed; skipping its rows (pip install pot torchcfm)")
        return None


# ---------------------------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------------------------


def speed_setup(args: argparse.Namespace, device: torch.device) -> SimpleNamespace:
    """One network and batch; a training step of the bare UNet and of each method; sampling calls.

    Each method's config comes from train.py's own parser and run_config, so the step runs with
    train.py's defaults (sigma_min, cfg dropout, time sampling, grad clipping, autocast).
    """
    codec = PixelCodec(args.latent_channels, args.latent_size)  # random latents of this shape stand in for data
    data = SimpleNamespace(num_classes=args.num_classes, channels=args.latent_channels)
    g = torch.Generator().manual_seed(args.seed)
    fit_labels = torch.arange(args.num_classes).repeat(50)
    fit_latents = torch.randn(len(fit_labels), *codec.latent_shape, generator=g) + fit_labels.view(-1, 1, 1, 1)
    configs, priors = {}, {}
    with tempfile.TemporaryDirectory() as prior_dir:  # cpd loads its prior from disk, as train.py does
        ClassGaussianPrior.fit(fit_latents, fit_labels, args.num_classes).save(prior_dir, {"codec": codec.fingerprint})
        for method in METHODS:
            argv = ["--method", method, "--batch_size", str(args.batch_size), "--device", str(device)]
            argv += ["--prior_dir", prior_dir] if method == "cpd" else []
            argv += ["--unet_config", args.unet_config] if args.unet_config else []
            configs[method] = train.run_config(train.parse_args(argv), codec, data)
            priors[method] = build_prior(configs[method], codec, device)
    config = configs["condot"]
    unet = build_unet(config["unet"]).to(device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config["learning_rate"], weight_decay=config["weight_decay"])
    x1 = torch.randn(args.batch_size, *codec.latent_shape, generator=g).to(device)
    labels = torch.randint(args.num_classes, (args.batch_size,), generator=g).to(device)
    ddpm_scheduler = training_scheduler(configs["ddpm"])

    def make_step(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            with autocast(device, config["mixed_precision"]):
                loss = loss_fn()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), config["max_grad_norm"])
            optimizer.step()
        return step

    def bare_loss() -> torch.Tensor:
        t = torch.rand(len(x1), device=device) * TIME_SCALE
        return F.mse_loss(unet(x1, t, class_labels=labels).sample.float(), x1)

    conditioning, idx = ClassConditioning(labels, args.num_classes), torch.arange(len(labels), device=device)
    steps = {"bare": make_step(bare_loss)}
    for method in METHODS:
        steps[method] = make_step(
            lambda m=method: train.training_loss(configs[m], unet, priors[m], ddpm_scheduler, x1, conditioning, idx)[0])

    xs = torch.randn(args.sample_batch_size, *codec.latent_shape, generator=g).to(device)
    sample_labels = torch.randint(args.num_classes, (len(xs),), generator=g).to(device)
    model = conditional_model(unet, {"class_labels": sample_labels})
    t_mid = torch.full((len(xs),), TIME_SCALE / 2, device=device)

    @torch.no_grad()
    def forward() -> torch.Tensor:
        return unet(xs, t_mid, class_labels=sample_labels).sample

    schedulers = {method: sampling_scheduler(configs[method]) for method in METHODS}

    def sample(method: str, nfe: int) -> torch.Tensor:
        return generate(model, xs, method, nfe, "euler", schedulers[method])[0]

    return SimpleNamespace(unet=unet, steps=steps, forward=forward, sample=sample, latent_shape=codec.latent_shape,
                           parameters=sum(p.numel() for p in unet.parameters()))


def time_training(bench: SimpleNamespace, args: argparse.Namespace, device: torch.device) -> dict:
    bench.unet.train()
    medians = interleaved_medians(bench.steps, args.repeats, device)
    bare = medians["bare"]
    return {name: {"median_ms": 1e3 * s, "overhead_pct": 100 * (s / bare - 1)} for name, s in medians.items()}


def time_coupling(bench: SimpleNamespace, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Exact assignment (ours) vs POT's ot.emd vs torchcfm's OT plan sampler, on the same batches."""
    ot = optional_module("ot")
    cfm = optional_module("torchcfm.conditional_flow_matching")
    matcher = cfm.ExactOptimalTransportConditionalFlowMatcher(sigma=0.0) if cfm else None
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    for n in args.ot_batch_sizes:
        x0, x1 = (torch.randn(n, *bench.latent_shape, generator=g).to(device) for _ in range(2))
        labels = torch.zeros(n, dtype=torch.long, device=device)
        fns = {"ours": lambda: couple(x0, x1, labels, "ot")}
        if ot:
            uniform = ot.unif(n)
            fns["pot_emd"] = lambda: ot.emd(uniform, uniform, torch.cdist(x1.flatten(1), x0.flatten(1)).pow(2).cpu().numpy())
        if matcher:
            # What the matcher's sample_location_and_conditional_flow runs to pair a batch.
            fns["torchcfm"] = lambda: matcher.ot_sampler.sample_plan(x0, x1)
        medians = interleaved_medians(fns, args.repeats, device, warmup=1)
        perm = ot_permutation(x0, x1)
        row = {"batch": n, "ours_ms": 1e3 * medians["ours"], "ours_duplicate_x0": n - len(perm.unique()),
               "ours_pair_cost": pair_cost(x0[perm], x1), "pot_emd_ms": None, "torchcfm_ms": None,
               "torchcfm_duplicate_x0": None, "torchcfm_pair_cost": None}
        if ot:
            row["pot_emd_ms"] = 1e3 * medians["pot_emd"]
        if matcher:
            draws = [matcher.ot_sampler.sample_plan(x0, x1) for _ in range(args.repeats)]
            row.update(torchcfm_ms=1e3 * medians["torchcfm"],
                       torchcfm_duplicate_x0=statistics.median(n - len(a.unique(dim=0)) for a, _ in draws),
                       torchcfm_pair_cost=statistics.mean(pair_cost(a, b) for a, b in draws))
        rows.append(row)
    return rows


def pair_cost(x0: torch.Tensor, x1: torch.Tensor) -> float:
    return transport_cost(x0, x1).item()


def time_sampling(bench: SimpleNamespace, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """generate() at each NFE (euler for the flows, DDIM for ddpm) against NFE x one bare forward."""
    bench.unet.eval()
    rows = []
    for nfe in args.nfes:
        fns = {"forward": bench.forward, "euler": lambda: bench.sample("condot", nfe), "ddim": lambda: bench.sample("ddpm", nfe)}
        medians = interleaved_medians(fns, args.sample_repeats, device, warmup=0)  # warm from the training steps
        bound = nfe * medians["forward"]
        rows.append({"nfe": nfe, "forward_ms": 1e3 * medians["forward"], "nfe_x_forward_ms": 1e3 * bound,
                     "euler_ms": 1e3 * medians["euler"], "euler_ratio": medians["euler"] / bound,
                     "ddim_ms": 1e3 * medians["ddim"], "ddim_ratio": medians["ddim"] / bound})
    return rows


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory one call adds to what the process already holds (weights, optimizer state, batch).

    CUDA: torch.cuda.max_memory_allocated. CPU (Linux): the peak resident set size VmHWM, which
    /proc/self/clear_refs resets, so each call is measured on its own (getrusage's ru_maxrss cannot
    be reset, so it would only show the largest call of the whole run). None where neither exists.
    """
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so the baseline is live memory
    except (OSError, AttributeError):  # not glibc: freed pages may stay resident and hide part of the rise
        pass
    before = proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    fn()
    return (proc_status_kib("VmHWM") - before) / 1024


def proc_status_kib(name: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{name}:"))


def measure_memory(bench: SimpleNamespace, args: argparse.Namespace, device: torch.device) -> dict:
    kind = ("CUDA: torch.cuda.max_memory_allocated above the memory already allocated" if device.type == "cuda"
            else "CPU: rise of the peak resident set size (VmHWM) above the resident memory before the call")
    bench.unet.train()
    mib = {f"train_step_{name}": peak_memory_mib(step, device) for name, step in bench.steps.items()}
    bench.unet.eval()
    nfe = max(args.nfes)
    mib[f"sampling_nfe{nfe}_batch{args.sample_batch_size}"] = peak_memory_mib(lambda: bench.sample("condot", nfe), device)
    return {"kind": kind, "mib": mib}


def cell(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def speed_markdown(result: dict) -> str:
    s, mem = result["settings"], result["memory"]
    shape = "x".join(map(str, s["latent_shape"]))
    lines = [f"Training step, batch {s['batch_size']}, {result['parameters'] / 1e6:.2f}M-parameter UNet on {shape} latents "
             f"(median of {s['repeats']}):", ""]
    lines += md_table(["step", "median ms", "overhead vs bare"], [
        [name, f"{r['median_ms']:.1f}", "-" if name == "bare" else f"{r['overhead_pct']:+.1f}%"]
        for name, r in result["training_step"].items()])
    lines += ["", "BatchOT pairing (ours: exact assignment; torchcfm: OT plan, then pairs drawn with replacement):", ""]
    lines += md_table(["batch", "ours ms", "POT ot.emd ms", "torchcfm ms", "duplicated x0: ours / torchcfm",
                       "pair cost: ours / torchcfm"], [
        [str(r["batch"]), f"{r['ours_ms']:.1f}", cell(r["pot_emd_ms"], ".1f"), cell(r["torchcfm_ms"], ".1f"),
         f"{r['ours_duplicate_x0']} / {cell(r['torchcfm_duplicate_x0'], '.0f')}",
         f"{r['ours_pair_cost']:.1f} / {cell(r['torchcfm_pair_cost'], '.1f')}"] for r in result["coupling"]])
    lines += ["", f"Sampling, batch {s['sample_batch_size']} (median of {s['sample_repeats']}):", ""]
    lines += md_table(["NFE", "NFE x forward ms", "euler ms", "euler / bound", "DDIM ms", "DDIM / bound"], [
        [str(r["nfe"]), f"{r['nfe_x_forward_ms']:.1f}", f"{r['euler_ms']:.1f}", f"{r['euler_ratio']:.2f}",
         f"{r['ddim_ms']:.1f}", f"{r['ddim_ratio']:.2f}"] for r in result["sampling"]])
    lines += ["", f"Peak memory ({mem['kind']}):", ""]
    lines += md_table(["case", "MiB"], [[case, cell(mib, ".1f")] for case, mib in mem["mib"].items()])
    return "\n".join(lines)


def speed(args: argparse.Namespace) -> dict:
    seed_everything(args.seed)
    device = pick_device(args.device)
    machine = machine_info(device)
    if machine["load_average"][0] > 0.5 * machine["cpu_count"]:
        print(f"warning: the machine is busy (load average {machine['load_average'][0]:.1f} on {machine['cpu_count']} CPUs); "
              "CPU timings will be noisy (OMP_NUM_THREADS=1 suffers less from the contention)")
    bench = speed_setup(args, device)
    result = {
        "command": args.command_line, "torch": torch.__version__, "machine": machine, "parameters": bench.parameters,
        "settings": dict(batch_size=args.batch_size, repeats=args.repeats, sample_batch_size=args.sample_batch_size,
                         sample_repeats=args.sample_repeats, latent_shape=list(bench.latent_shape), num_classes=args.num_classes,
                         unet_config=args.unet_config or "neural_models.DEFAULT_UNET", seed=args.seed,
                         step="loss, backward, clip_grad_norm, AdamW step (EMA and logging left out: alike for every method)"),
    }
    for key, what, fn in (("training_step", "training steps", time_training), ("coupling", "BatchOT pairing", time_coupling),
                          ("sampling", "sampling", time_sampling), ("memory", "peak memory", measure_memory)):
        print(f"timing {what}...", flush=True)
        result[key] = fn(bench, args, device)
    result["machine"]["load_average_end"] = list(os.getloadavg())
    print(speed_markdown(result))
    write_json(args.output, result)
    print(f"\nfigures written to {args.output}")
    return result


# ---------------------------------------------------------------------------------------------
# compare: presets
# ---------------------------------------------------------------------------------------------

NFES = (1, 2, 4, 8, 15, 30, 60)
SOLVERS = ("euler", "midpoint")
HEADLINE_NFE = 15


@dataclass(frozen=True)
class Preset:
    """Sizes of one comparison. Transport cost and accuracy are cheap and cover every NFE and
    solver; FID needs Inception-v3 at 299 px (about 10 images/s on two CPU cores), so it is
    computed on `fid_samples` at 15 NFE (the headline table) and on `curve_samples` along the
    FID-vs-NFE curve (`fid_nfes`) and the FID-vs-step curve (`checkpoints` points)."""

    about: str
    image_size: int
    max_train_samples: int | None  # training images for the VQ-VAE, prior, flows and classifier
    vqvae_steps: int
    unet: dict  # UNet2DModel overrides of neural_models.DEFAULT_UNET, one network for all methods
    train_steps: int
    batch_size: int
    lr_warmup_steps: int
    checkpoints: int  # FID-vs-step points (the last is the final network)
    classifier_epochs: int
    eval_samples: int  # per NFE and solver: transport cost and accuracy
    fid_samples: int  # headline FID/KID at 15 NFE
    curve_samples: int  # FID vs NFE and FID vs step
    fid_nfes: tuple[int, ...]
    fid_solvers: tuple[str, ...]  # of the flows (ddpm always samples with DDIM)
    fid_reference: int | None  # MNIST test images of the FID reference (None: all 10,000)
    kid_subsets: int
    covariance: str = "diag"


PRESETS = {
    "toy": Preset(
        about="a smoke test for the test suite: tiny networks and sets, seconds; its figures mean nothing",
        image_size=16, max_train_samples=64, vqvae_steps=2,
        unet=dict(block_out_channels=[16, 16], norm_num_groups=8, attention_head_dim=8, layers_per_block=1),
        train_steps=4, batch_size=16, lr_warmup_steps=1, checkpoints=2, classifier_epochs=1,
        eval_samples=4, fid_samples=4, curve_samples=4, fid_nfes=(15,), fid_solvers=("euler",),
        fid_reference=4, kid_subsets=2,
    ),
    "quick": Preset(
        about="about 30 minutes on 2 CPU cores, half of it Inception (~10 images/s): FID/KID on 1000 samples "
              "per method at 15 NFE, and on 200 (a prefix of them where they coincide) for the FID curves at "
              "NFE 4/15/60 (euler; ddpm: DDIM) and at steps 200/400/600, against 1000 test images; accuracy "
              "and transport cost at every NFE and solver on 500 samples. A 0.7M-parameter UNet (0.12 s a "
              "step at batch 128), 600 steps per method, a VQ-VAE of 150 steps and 20k training images; "
              "a low-rank class covariance (at this budget it beat the diagonal one by ~6 FID, docs/RESULTS.md)",
        image_size=32, max_train_samples=20_000, vqvae_steps=150,
        unet=dict(block_out_channels=[32, 64], layers_per_block=1),
        train_steps=600, batch_size=128, lr_warmup_steps=50, checkpoints=3, classifier_epochs=3,
        eval_samples=500, fid_samples=1000, curve_samples=200, fid_nfes=(4, 15, 60), fid_solvers=("euler",),
        fid_reference=1000, kid_subsets=50, covariance="lowrank",
    ),
    "full": Preset(
        about="for a GPU: the default network, all 60k training images, 10k samples per FID at every NFE "
              "and solver against the whole test split",
        image_size=32, max_train_samples=None, vqvae_steps=4680,
        unet={}, train_steps=20_000, batch_size=128, lr_warmup_steps=500, checkpoints=10, classifier_epochs=3,
        eval_samples=10_000, fid_samples=10_000, curve_samples=10_000, fid_nfes=NFES, fid_solvers=SOLVERS,
        fid_reference=None, kid_subsets=100,
    ),
}


def data_flags(preset: Preset) -> list[str]:
    flags = ["--dataset", "mnist", "--image_size", str(preset.image_size)]
    return flags + (["--max_train_samples", str(preset.max_train_samples)] if preset.max_train_samples else [])


def solvers_of(method: str) -> tuple[str, ...]:
    return ("ddim",) if method == "ddpm" else SOLVERS


def headline_solver(method: str) -> str:
    return solvers_of(method)[0]


# ---------------------------------------------------------------------------------------------
# compare: the class-conditional variant
# ---------------------------------------------------------------------------------------------


class ClassConditional:
    """The class-conditional MNIST comparison: what the pipeline in `compare` asks of a variant.

    A variant names the methods it compares, fits their prior, adds each method's train.py flags,
    draws evaluation samples and scores their alignment with the condition; the pipeline below
    touches conditions only through these members, so a new variant is a new class in VARIANTS.
    """

    title = "Class-conditional MNIST"
    methods = ("cpd", "condot", "batchot", "ddpm")

    def __init__(self, args: argparse.Namespace, preset: Preset, out: Path, vqvae_dir: Path, device: torch.device):
        self.args, self.preset, self.out, self.vqvae_dir, self.device = args, preset, out, vqvae_dir, device
        self.prior_dir = out / "prior"
        self.classifier = None

    def fit_prior(self) -> dict:
        if (self.prior_dir / "prior.json").is_file():
            return read_json(self.prior_dir / "prior.json", "prior config")
        return train_mapper.main(train_mapper.parse_args([
            *data_flags(self.preset), "--condition", "class", "--vqvae_directory", str(self.vqvae_dir),
            "--output_dir", str(self.prior_dir), "--covariance", self.preset.covariance, *device_flags(self.args)]))

    def train_flags(self, method: str) -> list[str]:
        return ["--prior_dir", str(self.prior_dir)] if method == "cpd" else []

    def load_classifier(self) -> dict:
        """metrics.py's alignment classifier at --classifier_dir, trained there first if missing."""
        directory = Path(self.args.classifier_dir or self.out / "classifier")
        if not (directory / "config.json").is_file():
            metrics.main(metrics.parse_args([
                "train-classifier", *data_flags(self.preset), "--output_dir", str(directory),
                "--epochs", str(self.preset.classifier_epochs), "--batch_size", str(self.preset.batch_size),
                "--seed", str(self.args.seed), *device_flags(self.args)]))
        self.classifier = metrics.load_classifier(directory, self.device)
        if self.classifier.config["image_size"] != self.preset.image_size:
            raise UserError(f"the classifier in {directory} takes {self.classifier.config['image_size']}px images, "
                            f"this preset makes {self.preset.image_size}px; pass another --classifier_dir")
        return {"directory": str(directory), **read_json(directory / "config.json", "classifier config")}

    def sample(self, run: dict, n: int, nfe: int, solver: str, seed: int) -> dict:
        """n samples, classes spread evenly; images as uint8 (N, C, H, W)."""
        labels = torch.arange(n) % run["config"]["num_classes"]
        result = sample_run(run, labels, nfe=nfe, solver=solver, seed=seed)
        return result | {"images": metrics.to_uint8(result["images"] * 2 - 1), "labels": labels}

    def alignment(self, samples: dict) -> dict:
        return {"accuracy": metrics.classifier_accuracy(self.classifier, samples["images"], samples["labels"])}

    def grid(self, run: dict, nfe: int, solver: str, seed: int):
        """Four samples of every class, one column per class."""
        num_classes = run["config"]["num_classes"]
        labels = torch.arange(num_classes).repeat(4)
        images = sample_run(run, labels, nfe=nfe, solver=solver, seed=seed)["images"]
        return labelled_grid(images, labels, nrow=num_classes)


class TextConditional(ClassConditional):
    """MNIST with captions made from the labels: cpd (the text mapper's prior) against condot, both
    cross-attending to the MiniLM token states. Alignment is the classifier's accuracy against the
    digit a prompt names, over all samples and for the training wordings and the held-out ones."""

    title = "Text-conditional MNIST (captions)"
    methods = ("cpd", "condot")

    def __init__(self, args: argparse.Namespace, preset: Preset, out: Path, vqvae_dir: Path, device: torch.device):
        super().__init__(args, preset, out, vqvae_dir, device)
        self.prior_dir = out / "mapper"

    def fit_prior(self) -> dict:
        if (self.prior_dir / "prior.json").is_file():
            return read_json(self.prior_dir / "prior.json", "mapper config")
        return train_mapper.main(train_mapper.parse_args([
            *data_flags(self.preset), "--condition", "text", "--vqvae_directory", str(self.vqvae_dir),
            "--output_dir", str(self.prior_dir), "--seed", str(self.args.seed), *device_flags(self.args)]))

    def train_flags(self, method: str) -> list[str]:
        return ["--condition", "text", *super().train_flags(method)]

    def sample(self, run: dict, n: int, nfe: int, solver: str, seed: int) -> dict:
        """n samples for prompts naming every digit in turn, in seen and held-out wordings."""
        prompts, digits, heldout = caption_prompts(n)
        result = sample_run(run, None, nfe=nfe, solver=solver, seed=seed, prompts=prompts)
        return result | {"images": metrics.to_uint8(result["images"] * 2 - 1), "labels": digits, "heldout": heldout}

    def alignment(self, samples: dict) -> dict:
        def accuracy(keep: torch.Tensor) -> float:
            return metrics.classifier_accuracy(self.classifier, samples["images"][keep], samples["labels"][keep])

        heldout = samples["heldout"]
        return {"accuracy": accuracy(torch.ones_like(heldout)), "accuracy_seen": accuracy(~heldout),
                "accuracy_heldout": accuracy(heldout)}

    def grid(self, run: dict, nfe: int, solver: str, seed: int):
        """One column per digit; rows: two seen wordings, then the two held-out ones."""
        rows = [("train", 0), ("train", 1), ("heldout", 0), ("heldout", 1)]
        prompts = [digit_captions(d, wording)[k] for wording, k in rows for d in range(10)]
        images = sample_run(run, None, nfe=nfe, solver=solver, seed=seed, prompts=prompts)["images"]
        return labelled_grid(images, torch.arange(len(prompts)) % 10, nrow=10)


def caption_prompts(n: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Prompts, the digit each names, and whether its wording was held out of training. Samples go
    in pairs, one seen and one held-out wording of the same digit, digits 0..9 in turn, each wording's
    templates taking turns every 20 samples: any prefix of 20k samples is balanced over digits and
    over seen and held-out wordings."""
    prompts, heldout = [], []
    for i in range(n):
        held = i % 2 == 1
        captions = digit_captions(i // 2 % 10, "heldout" if held else "train")
        prompts.append(captions[i // 20 % len(captions)])
        heldout.append(held)
    return prompts, torch.arange(n) // 2 % 10, torch.tensor(heldout)


VARIANTS = {"class": ClassConditional, "text": TextConditional}


# ---------------------------------------------------------------------------------------------
# compare: the pipeline
# ---------------------------------------------------------------------------------------------


def device_flags(args: argparse.Namespace) -> list[str]:
    return ["--device", args.device] if args.device else []


def train_vqvae_stage(args: argparse.Namespace, preset: Preset, out: Path) -> Path:
    if args.vqvae_directory:
        return Path(args.vqvae_directory)
    directory = out / "vqvae"
    if not (directory / "config.json").is_file():
        train_vqvae.main(train_vqvae.parse_args([
            *data_flags(preset), "--output_dir", str(directory), "--max_steps", str(preset.vqvae_steps),
            "--batch_size", str(preset.batch_size), "--seed", str(args.seed), *device_flags(args)]))
    return directory


def train_stage(args: argparse.Namespace, preset: Preset, out: Path, variant, method: str) -> dict:
    """Train one method (or reuse its finished run; an interrupted one resumes from its last checkpoint)."""
    run_dir = out / "runs" / method
    if (run_dir / "unet" / "config.json").is_file():
        return {"run_dir": str(run_dir), "reused": True}
    every = preset.train_steps // preset.checkpoints
    argv = [*data_flags(preset), "--method", method, "--vqvae_directory", str(variant.vqvae_dir),
            "--output_dir", str(run_dir), "--unet_config", str(out / "unet.json"),
            "--max_steps", str(preset.train_steps), "--batch_size", str(preset.batch_size),
            "--lr_warmup_steps", str(preset.lr_warmup_steps), "--seed", str(args.seed),
            "--checkpointing_steps", str(every), "--checkpoints_total_limit", str(-(-preset.train_steps // every)),
            "--validation_steps", "0", *variant.train_flags(method), *device_flags(args)]
    if (run_dir / "config.json").is_file():
        argv += ["--resume_from_checkpoint", "latest"]
    start = time.perf_counter()
    result = train.main(train.parse_args(argv))
    if result.get("stopped"):
        raise UserError(f"training {method} was stopped; rerun with --skip_existing to continue it")
    return {"run_dir": str(run_dir), "reused": False, "seconds": round(time.perf_counter() - start, 1)}


@dataclass(frozen=True)
class Scorer:
    """What scoring a method needs: the variant, the preset's sizes, the FID reference and network."""

    variant: ClassConditional
    preset: Preset
    real: torch.Tensor  # Inception features of the reference images
    inception: torch.nn.Module
    device: torch.device
    seed: int

    def fid(self, images: torch.Tensor, counts: list[int], desc: str) -> list[dict]:
        """FID/KID of the first `count` images for each count: features are extracted once, so a
        curve point on fewer samples costs nothing where it coincides with the headline point."""
        features = metrics.inception_features(images[:max(counts)], self.inception, desc=desc)
        return [metrics.fid_kid(self.real, features[:count], kid_subsets=self.preset.kid_subsets, seed=self.seed)
                for count in counts]


def evaluate_point(scorer: Scorer, run: dict, method: str, nfe: int, solver: str) -> dict:
    p = scorer.preset
    headline = nfe == HEADLINE_NFE and solver == headline_solver(method)
    on_curve = nfe in p.fid_nfes and solver in (*p.fid_solvers, "ddim")
    counts = sorted({*([p.fid_samples] if headline else []), *([p.curve_samples] if on_curve else [])})
    samples = scorer.variant.sample(run, max([p.eval_samples, *counts]), nfe, solver, scorer.seed)
    row = dict(nfe=nfe, solver=solver, nfe_used=samples["nfe"], num_samples=len(samples["labels"]),
               transport_cost=transport_cost(samples["x0"], samples["x1"]).item(), **scorer.variant.alignment(samples))
    if counts:
        row["fid"] = scorer.fid(samples["images"], counts, desc=f"{method} nfe {nfe} {solver}")
    return row


def fid_at(row: dict, count: int) -> dict:
    return next(entry for entry in row["fid"] if entry["num_fake"] == count)


def fid_vs_step(scorer: Scorer, run_dir: Path, method: str, final: dict) -> list[dict]:
    """FID at 15 NFE of each checkpoint's EMA network; the last point is the final network's."""
    p, points = scorer.preset, []
    for path in list_checkpoints(run_dir):
        step = checkpoint_step(path)
        if step >= p.train_steps:  # the final network: the same EMA weights, scored already
            continue
        run = load_run(run_dir, str(path), scorer.device)
        samples = scorer.variant.sample(run, p.curve_samples, HEADLINE_NFE, headline_solver(method), scorer.seed)
        points.append({"step": step, **scorer.fid(samples["images"], [p.curve_samples], desc=f"{method} step {step}")[0]})
    return points + [{"step": p.train_steps, **fid_at(final, p.curve_samples)}]


def evaluate_stage(scorer: Scorer, out: Path, method: str) -> dict:
    path = out / "eval" / f"{method}.json"
    if path.is_file():
        return read_json(path, "evaluation")
    start = time.perf_counter()
    run_dir = out / "runs" / method
    run = load_run(run_dir, None, scorer.device)
    rows = [evaluate_point(scorer, run, method, nfe, solver) for solver in solvers_of(method) for nfe in NFES]
    final = next(r for r in rows if r["nfe"] == HEADLINE_NFE and r["solver"] == headline_solver(method))
    head = fid_at(final, scorer.preset.fid_samples)
    alignment = {k: v for k, v in final.items() if k not in ("nfe", "solver", "nfe_used", "num_samples", "fid")}
    result = {
        "parameters": sum(p.numel() for p in run["unet"].parameters()),
        "headline": dict(nfe=HEADLINE_NFE, solver=final["solver"], fid=head["fid"], kid=head["kid"], kid_std=head["kid_std"],
                         fid_samples=head["num_fake"], eval_samples=final["num_samples"], **alignment),
        "evaluations": rows,
        "fid_vs_step": fid_vs_step(scorer, run_dir, method, final),
    }
    result["seconds"] = round(time.perf_counter() - start, 1)
    write_json(path, result)
    return result


def curve(result: dict, method: str, solver: str, preset: Preset) -> list[tuple[int, float]]:
    return [(r["nfe"], fid_at(r, preset.curve_samples)["fid"]) for r in result["methods"][method]["evaluations"]
            if r["solver"] == solver and "fid" in r and any(e["num_fake"] == preset.curve_samples for e in r["fid"])]


def results_markdown(result: dict, preset: Preset) -> str:
    methods, machine = result["methods"], result["machine"]
    align = [k for k in next(iter(methods.values()))["headline"]
             if k not in ("nfe", "solver", "fid", "kid", "kid_std", "fid_samples", "eval_samples", "transport_cost")]
    lines = [f"# {result['variant']}: cpd against its baselines (preset `{result['preset']}`)", "",
             f"`{result['command']}` at commit `{result['git_commit']}`: {result['seconds'] / 60:.1f} min on "
             f"{machine.get('gpu', machine['device'])}, {machine['cpu_count']} CPUs.", "",
             f"## At {HEADLINE_NFE} NFE (euler; ddpm: DDIM)", "",
             f"FID and KID on {preset.fid_samples} samples against {preset.fid_reference or 'all'} MNIST test images; "
             f"{', '.join(align)} and transport cost (mean |x1 - x0|^2 in latent space) on the evaluation samples.", ""]
    lines += md_table(["method", "FID", "KID (x100)", *align, "transport cost"], [
        [m, f"{h['fid']:.2f}", f"{100 * h['kid']:.3f}", *(f"{h[k]:.3f}" for k in align), f"{h['transport_cost']:.1f}"]
        for m, h in ((m, r["headline"]) for m, r in methods.items())])
    lines += ["", f"## FID against NFE ({preset.curve_samples} samples)", ""]
    rows = []
    for m in methods:
        for solver in solvers_of(m):
            points = dict(curve(result, m, solver, preset))
            if points:
                rows.append([m, solver, *(f"{points[n]:.2f}" if n in points else "" for n in preset.fid_nfes)])
    lines += md_table(["method", "solver", *map(str, preset.fid_nfes)], rows)
    lines += ["", f"## {align[0].capitalize()} / transport cost against NFE ({preset.eval_samples}+ samples)", ""]
    lines += md_table(["method", "solver", *map(str, NFES)], [
        [m, solver, *(f"{e[align[0]]:.3f} / {e['transport_cost']:.0f}" for e in r["evaluations"] if e["solver"] == solver)]
        for m, r in methods.items() for solver in solvers_of(m)])
    steps = [p["step"] for p in next(iter(methods.values()))["fid_vs_step"]]
    lines += ["", f"## FID at {HEADLINE_NFE} NFE against training step ({preset.curve_samples} samples)", ""]
    lines += md_table(["method", *map(str, steps)],
                      [[m, *(f"{p['fid']:.2f}" for p in r["fid_vs_step"])] for m, r in methods.items()])
    return "\n".join(lines) + "\n"


def agg_figure(width: float, height: float) -> Figure:
    """A figure drawn by Agg into files: no display, no pyplot state."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_curves(result: dict, preset: Preset, out: Path) -> None:
    fig = agg_figure(6, 4)
    ax = fig.subplots()
    for m in result["methods"]:
        for solver in solvers_of(m):
            points = curve(result, m, solver, preset)
            if points:
                style = "--" if solver == "midpoint" else "-"
                ax.plot(*zip(*points), marker="o", linestyle=style, label=f"{m} ({solver})")
    ax.set(xscale="log", xlabel="NFE", ylabel=f"FID ({preset.curve_samples} samples)", title="FID against NFE")
    ax.set_xticks(preset.fid_nfes, [str(n) for n in preset.fid_nfes])
    ax.set_xticks([], minor=True)  # a log axis would label its minor ticks too
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fid_vs_nfe.png", dpi=120)

    fig = agg_figure(6, 4)
    ax = fig.subplots()
    for m, r in result["methods"].items():
        ax.plot([p["step"] for p in r["fid_vs_step"]], [p["fid"] for p in r["fid_vs_step"]], marker="o", label=m)
    ax.set(xlabel="training step", ylabel=f"FID at {HEADLINE_NFE} NFE ({preset.curve_samples} samples)",
           title="FID during training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fid_vs_step.png", dpi=120)


def plot_grids(variant, out: Path, device: torch.device, seed: int) -> None:
    """Side-by-side samples of every method at the same seed and 15 NFE."""
    fig = agg_figure(4 * len(variant.methods), 2.2)
    for ax, method in zip(fig.subplots(1, len(variant.methods)), variant.methods):
        run = load_run(out / "runs" / method, None, device)
        ax.imshow(variant.grid(run, HEADLINE_NFE, headline_solver(method), seed))
        ax.set_title(f"{method} ({HEADLINE_NFE} NFE, {headline_solver(method)})")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "grids.png", dpi=150)


def compare(args: argparse.Namespace) -> dict:
    seed_everything(args.seed)
    device = pick_device(args.device)
    preset = PRESETS[args.preset]
    if args.covariance:
        preset = replace(preset, covariance=args.covariance)
    out = Path(args.output_dir)
    if out.is_dir() and any(out.iterdir()) and not args.skip_existing:
        raise UserError(f"{out} already holds a comparison; pass --skip_existing to reuse its finished stages, "
                        "or choose another --output_dir")
    settings = json.loads(json.dumps(asdict(preset) | {"nfes": NFES, "seed": args.seed, "variant": args.variant}))
    saved = read_json(out / "settings.json", "comparison settings") if (out / "settings.json").is_file() else None
    if saved is not None and {"variant": "class"} | saved != settings:  # older comparisons were all class
        raise UserError(f"{out} holds a comparison with other settings (preset, variant or seed); "
                        "choose another --output_dir")
    write_json(out / "settings.json", settings)
    write_json(out / "unet.json", preset.unet)
    result = {"command": args.command_line, "preset": args.preset, "settings": settings,
              "git_commit": git_commit(), "machine": machine_info(device), "torch": torch.__version__, "stage_seconds": {}}
    start = time.perf_counter()

    def stage(name: str, fn: Callable[[], object]):
        began = time.perf_counter()
        value = fn()
        result["stage_seconds"][name] = round(time.perf_counter() - began, 1)
        return value

    vqvae_dir = stage("vqvae", lambda: train_vqvae_stage(args, preset, out))
    variant = VARIANTS[args.variant](args, preset, out, vqvae_dir, device)
    result["variant"] = variant.title
    result["prior"] = stage("prior", variant.fit_prior)
    result["classifier"] = stage("classifier", variant.load_classifier)
    training = {m: stage(f"train_{m}", lambda m=m: train_stage(args, preset, out, variant, m)) for m in variant.methods}

    inception = metrics.load_inception(device=device)
    real = stage("fid_reference", lambda: metrics.reference_features(
        "mnist", "test", inception, preset.image_size, preset.fid_reference, cache_dir=args.fid_cache_dir, seed=args.seed))
    result["fid_reference"] = {"dataset": "mnist", "split": "test", "count": len(real), "image_size": preset.image_size}
    result["vqvae_directory"] = str(vqvae_dir)
    scorer = Scorer(variant, preset, real, inception, device, args.seed)
    result["methods"] = {m: {"train": training[m], **stage(f"evaluate_{m}", lambda m=m: evaluate_stage(scorer, out, m))}
                         for m in variant.methods}
    stage("grids", lambda: plot_grids(variant, out, device, args.seed))
    result["seconds"] = round(time.perf_counter() - start, 1)
    plot_curves(result, preset, out)
    write_json(out / "results.json", result)
    markdown = results_markdown(result, preset)
    (out / "results.md").write_text(markdown)
    print(markdown)
    print(f"results in {out}: results.json, results.md, fid_vs_nfe.png, fid_vs_step.png, grids.png")
    return result


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

COMMANDS = {"speed": speed, "compare": compare}


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    s = commands.add_parser("speed", help="time training steps, the OT coupling and sampling; peak memory")
    s.add_argument("--batch_size", type=int, default=128, help="training batch (the issue's overhead target is at 128)")
    s.add_argument("--repeats", type=int, default=20, help="timed training steps (and OT pairings) per case")
    s.add_argument("--ot_batch_sizes", type=int_list, default=[128, 256, 1024])
    s.add_argument("--nfes", type=int_list, default=[1, 2, 4, 8, 15])
    s.add_argument("--sample_batch_size", type=int, default=256)
    s.add_argument("--sample_repeats", type=int, default=3, help="timed sampling calls per NFE")
    s.add_argument("--latent_channels", type=int, default=4, help="4x8x8 latents, 10 classes: the MNIST demo's")
    s.add_argument("--latent_size", type=int, default=8)
    s.add_argument("--num_classes", type=int, default=10)
    s.add_argument("--unet_config", default=None, help="json of UNet2DModel overrides (default: neural_models.DEFAULT_UNET)")
    s.add_argument("--output", default="docs/speed.json")

    c = commands.add_parser("compare", help="train and evaluate cpd against its baselines on MNIST")
    c.add_argument("--preset", default="quick", choices=tuple(PRESETS),
                   help="; ".join(f"{name}: {p.about}" for name, p in PRESETS.items()))
    c.add_argument("--variant", default="class", choices=tuple(VARIANTS),
                   help="class: cpd, condot, batchot, ddpm on the digit classes; text: cpd against condot on "
                        "captions made from the labels, alignment on seen and held-out wordings")
    c.add_argument("--covariance", default=None, choices=COVARIANCES,
                   help="class variant: the class prior's covariance (default: the preset's)")
    c.add_argument("--output_dir", default="runs/benchmark")
    c.add_argument("--skip_existing", action="store_true",
                   help="reuse the finished stages in --output_dir (an interrupted training run resumes)")
    c.add_argument("--vqvae_directory", default=None, help="reuse this VQ-VAE (default: train one in <output_dir>/vqvae)")
    c.add_argument("--classifier_dir", default=None, help="alignment classifier from `metrics.py train-classifier` "
                   "(default: <output_dir>/classifier, trained there if missing)")
    c.add_argument("--fid_cache_dir", default="runs/fid_refs", help="where the FID reference features are cached")

    for sub in (s, c):
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["python", "benchmark.py", *(sys.argv[1:] if argv is None else argv)])
    return args


@cli_entry
def main(args: argparse.Namespace) -> dict:
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    main(parse_args())
