"""Sample a trained run: a labelled grid, one PNG per image, and an .npz of everything.

    python sample.py --run_dir runs/cpd-mnist --labels 0,1,7 --nfe 15 --solver euler
    python sample.py --run_dir runs/cpd-mnist --num_samples 100 --output_dir samples/cpd
    python sample.py --run_dir runs/text-mnist --prompts "the number seven" "digit 3, drawn in ink" --cfg_scale 2

The .npz holds `images` (uint8, N x H x W x C), `labels` (class, or prompt index, with
`prompts`), and the latents `x0` (prior
samples) and `x1` (where the ODE took them). The number of network evaluations actually
used is printed (classifier-free guidance batches both branches into one evaluation).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from flow import SOLVERS, generate
from neural_models import conditional_model
from runs import ClassConditioning, TextConditioning, decode_grid, load_run
from training_utils import UserError, cli_entry, pick_device, seed_everything


def requested_labels(args: argparse.Namespace, num_classes: int) -> torch.Tensor:
    """--labels as given, or --num_samples spread evenly over the classes."""
    if args.labels:
        try:
            labels = torch.tensor([int(x) for x in args.labels.split(",")])
        except ValueError:
            raise UserError(f"--labels must be comma-separated integers, got {args.labels!r}") from None
    else:
        labels = torch.arange(args.num_samples) % num_classes
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise UserError(f"unknown class {bad[0].item()}: this run has classes 0..{num_classes - 1}")
    return labels


def requested_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts_file:
        try:
            prompts = [l.strip() for l in open(args.prompts_file) if l.strip()]
        except OSError as err:
            raise UserError(f"cannot read --prompts_file {args.prompts_file}: {err.strerror}") from None
    else:
        prompts = args.prompts or []
    if not prompts:
        raise UserError("this run is text-conditional: pass --prompts \"...\" or --prompts_file FILE")
    return prompts


@torch.no_grad()
def sample_run(run: dict, labels: torch.Tensor | None = None, nfe: int = 15, solver: str = "euler", cfg_scale: float = 1.0,
               seed: int = 0, batch_size: int = 256, return_path: bool = False, prompts: list[str] | None = None) -> dict:
    """Latents x0 -> x1 and decoded images for class `labels` or text `prompts`, in batches;
    reports the NFE used."""
    config, device = run["config"], next(run["unet"].parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    out = {"x0": [], "x1": [], "images": [], "paths": []}
    nfe_used = 0
    count = len(prompts) if prompts is not None else len(labels)
    for chunk in torch.arange(count).split(batch_size):
        if prompts is not None:
            cond, null, prior_input = TextConditioning.for_prompts(run["text_encoder"], [prompts[i] for i in chunk])
        else:
            cond, null, prior_input = ClassConditioning(labels, config["num_classes"]).for_sampling(labels[chunk].to(device))
        x0 = run["prior"].sample(prior_input, generator=generator)
        model = conditional_model(run["unet"], cond, null, cfg_scale)
        x1, nfe_used, path = generate(model, x0, config["method"], nfe, solver, run["scheduler"], return_path)
        out["x0"].append(x0.cpu())
        out["x1"].append(x1.cpu())
        out["images"].append(decode_grid(run["codec"], x1))
        if path is not None:
            out["paths"].append(torch.stack([x for _, x in path]).cpu())
            out["times"] = [t for t, _ in path]
    result = {k: torch.cat(v, dim=1 if k == "paths" else 0) for k, v in out.items() if v and k != "times"}
    result.update(nfe=nfe_used, times=out.get("times"))
    return result


def labelled_grid(images: torch.Tensor, labels: torch.Tensor, nrow: int) -> Image.Image:
    """A grid with each image's class written in its corner."""
    pad = 2
    grid = make_grid(images, nrow=nrow, padding=pad).mul(255).round().byte().permute(1, 2, 0).numpy()
    canvas = Image.fromarray(grid).convert("RGB")
    canvas = canvas.resize((canvas.width * 2, canvas.height * 2), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    size = images.shape[-1]
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(i, nrow)
        draw.text((2 * (pad + col * (size + pad)) + 2, 2 * (pad + row * (size + pad))), str(label), fill=(255, 64, 64))
    return canvas


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> (N, H, W, C) uint8."""
    return images.mul(255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


@cli_entry
def main(args: argparse.Namespace) -> dict:
    seed_everything(args.seed)
    device = pick_device(args.device)
    run = load_run(args.run_dir, args.checkpoint, device)
    if run["config"]["condition"] == "text":
        prompts = [p for p in requested_prompts(args) for _ in range(args.samples_per_prompt)]
        labels = torch.arange(len(prompts)) // args.samples_per_prompt
    else:
        prompts, labels = None, requested_labels(args, run["config"]["num_classes"])
    result = sample_run(run, labels, args.nfe, args.solver, args.cfg_scale, args.seed, args.batch_size, prompts=prompts)

    out = Path(args.output_dir or Path(args.run_dir) / f"samples-nfe{args.nfe}-{args.solver}")
    out.mkdir(parents=True, exist_ok=True)
    images = to_uint8(result["images"])
    # Text grids: one row per prompt, each image marked with its prompt's line in prompts.txt.
    nrow = args.samples_per_prompt if prompts is not None else args.nrow
    labelled_grid(result["images"], labels, nrow=nrow).save(out / "grid.png")
    tag = "prompt" if prompts is not None else "class"
    for i, (image, label) in enumerate(zip(images, labels.tolist())):
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(out / f"{i:05d}-{tag}{label}.png")
    extra = {"prompts": np.array(prompts)} if prompts is not None else {}
    np.savez(out / "samples.npz", images=images, labels=labels.numpy(), x0=result["x0"].numpy(), x1=result["x1"].numpy(),
             **extra)
    if prompts is not None:
        (out / "prompts.txt").write_text("".join(f"{i}: {p}\n" for i, p in enumerate(prompts[::args.samples_per_prompt])))
    summary = dict(run_dir=str(args.run_dir), method=run["config"]["method"], num_samples=len(labels), nfe=result["nfe"],
                   solver=args.solver if run["config"]["method"] != "ddpm" else "ddim", cfg_scale=args.cfg_scale,
                   seed=args.seed, grid=str(out / "grid.png"))
    print(json.dumps(summary))
    print(f"{len(labels)} samples with {result['nfe']} network evaluations each; grid at {out / 'grid.png'}")
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True, help="a train.py output folder")
    parser.add_argument("--checkpoint", default=None, help="latest or a path: sample that checkpoint's EMA weights "
                        "instead of the final unet/")
    parser.add_argument("--labels", default=None, help="comma-separated classes, e.g. 0,1,7")
    parser.add_argument("--num_samples", type=int, default=100, help="spread evenly over the classes (without --labels)")
    parser.add_argument("--prompts", nargs="+", default=None, help="text runs: the prompts")
    parser.add_argument("--prompts_file", default=None, help="text runs: one prompt per line")
    parser.add_argument("--samples_per_prompt", type=int, default=8)
    parser.add_argument("--nfe", type=int, default=15, help="network evaluations (fixed-step solvers and DDIM)")
    parser.add_argument("--solver", default="euler", choices=SOLVERS)
    parser.add_argument("--cfg_scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--nrow", type=int, default=10)
    parser.add_argument("--output_dir", default=None, help="default: <run_dir>/samples-nfe<N>-<solver>")
    parser.add_argument("--device", default=None)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
