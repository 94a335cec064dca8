"""Train a conditional flow in latent space: the conditional prior (cpd) or a baseline.

    python train.py --method cpd --prior_dir runs/prior-mnist --vqvae_directory runs/vqvae-mnist \
        --output_dir runs/cpd-mnist --max_steps 2000
    python train.py --condition text --method cpd --prior_dir runs/mapper-mnist ...   # captions

With --condition text the network is a UNet2DConditionModel with cross-attention on the text
encoder's token states, and cpd's prior is the mapper's point plus sigma noise.

Methods share the network, optimiser and budget, and differ only in where x0 comes from:
  cpd      x0 from the class-conditional Gaussian prior (train_mapper.py), independent pairs
  condot   x0 ~ N(0, I), independent pairs
  batchot  x0 ~ N(0, I), paired with the batch by exact minibatch optimal transport
  ddpm     epsilon prediction with diffusers' DDPMScheduler, sampled with DDIM

The run folder gets config.json, metrics.jsonl, sample grids, checkpoints/ and, at the end,
the EMA network in unet/ (UNet2DModel.from_pretrained loads it).
"""
from __future__ import annotations

import argparse
import functools
import json
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torchvision.utils import save_image
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from checkpoints import load_checkpoint, resolve_checkpoint, rng_state, save_checkpoint, set_rng_state
from dataset import add_dataset_args, dataset_from_args
from flow import COUPLINGS, SOLVERS, TIME_SAMPLINGS, couple, ddpm_loss, flow_matching_loss, generate, transport_cost
from latent_cache import caption_table, load_or_encode, load_or_encode_text
from neural_models import build_unet, conditional_model, load_codec, load_text_encoder, text_unet_config, unet_config
from runs import (
    METHODS, ClassConditioning, TextConditioning, build_prior, decode_grid, sampling_scheduler, save_unet, training_scheduler,
)
from training_utils import (
    UserError, all_gather_rows, autocast, cli_entry, init_distributed, pick_device, read_json, seed_everything, write_json,
)

# Config entries that must match to resume a run: they define the model and the problem.
RESUME_KEYS = ("method", "condition", "coupling", "latent_shape", "num_classes", "unet", "codec", "prior_dir",
               "text_encoder")


def run_config(args: argparse.Namespace, codec, dataset, text_dim: int | None = None) -> dict:
    config = vars(args).copy()
    overrides = args.unet_config or _unet_flag_overrides(args, cross_attention=text_dim is not None)
    config.update(
        coupling=args.coupling or METHODS[args.method],
        sigma=args.sigma if args.sigma is not None else (0.7 if args.condition == "text" else 1.0),
        latent_shape=list(codec.latent_shape),
        num_classes=dataset.num_classes,
        channels=dataset.channels,
        codec=codec.fingerprint,
        unet=text_unet_config(codec.latent_shape, text_dim, overrides) if text_dim
        else unet_config(codec.latent_shape, dataset.num_classes, overrides),
    )
    if args.condition == "class":
        config["text_encoder"] = None
    return config


def build_conditioning(args, dataset, labels: torch.Tensor, codec, device):
    """Class labels, or (for captions) the cached caption encodings and each item's caption ids."""
    if args.condition == "class":
        return ClassConditioning(labels, dataset.num_classes), None
    encoder = load_text_encoder(args.text_encoder, device)
    captions, ids, spans = caption_table(dataset.captions)
    table = load_or_encode_text(encoder, captions, codec.cache_dir)
    table = {k: v.to(device) for k, v in table.items()}
    return TextConditioning(table, ids.to(device), spans[labels.cpu()].to(device)), encoder.dim


def _unet_flag_overrides(args: argparse.Namespace, cross_attention: bool = False) -> dict:
    overrides = {}
    if args.block_out_channels:
        channels = [int(c) for c in args.block_out_channels.split(",")]
        attn = ["DownBlock2D"] * (len(channels) - 1) + ["CrossAttnDownBlock2D" if cross_attention else "AttnDownBlock2D"]
        overrides.update(block_out_channels=channels, down_block_types=attn,
                         up_block_types=[b.replace("Down", "Up") for b in reversed(attn)])
    if args.layers_per_block:
        overrides["layers_per_block"] = args.layers_per_block
    return overrides


def check_output_dir(args: argparse.Namespace, config: dict) -> Path:
    """A fresh run needs an unused folder; a resumed one needs the same model and problem."""
    out = Path(args.output_dir)
    saved = out / "config.json"
    if args.resume_from_checkpoint is None:
        if saved.exists():
            raise UserError(f"{out} already holds a run; pass --resume_from_checkpoint latest to continue it, "
                            "or choose another --output_dir")
    elif saved.exists():
        old = read_json(saved, "run config")
        diff = [k for k in RESUME_KEYS if old.get(k) != config.get(k)]
        if diff:
            raise UserError(f"cannot resume {out}: its {', '.join(diff)} differ from this command's")
    return out


def batch_indices(step: int, num_items: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's data indices at a step: epoch e visits a permutation seeded by (seed, e).

    The data order is a function of the step alone, so a resumed run sees the same batches;
    under DDP the global batch of batch_size x world is split between the ranks.
    """
    global_batch = batch_size * world
    epoch, i = divmod(step, num_items // global_batch)
    start = i * global_batch + rank * batch_size
    return epoch_permutation(num_items, seed, epoch)[start:start + batch_size]


@functools.lru_cache(maxsize=1)
def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class StopSignal:
    """Within `with`, SIGTERM/SIGINT set a flag, so the loop can finish its step and checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self) -> "StopSignal":
        self.received = None
        self.previous = [signal.signal(sig, self.handle) for sig in self.SIGNALS]
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in zip(self.SIGNALS, self.previous):
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        self.received = signal.Signals(signum).name


def couple_across_ranks(x0, x1, labels, coupling: str, world: int) -> torch.Tensor:
    """One assignment for the global batch (--ot_global): every rank solves the same problem
    on the gathered batch and keeps its own rows, so no plan is limited to one GPU's batch."""
    if world == 1:
        return couple(x0, x1, labels, coupling)
    rank, n = dist.get_rank(), len(x1)
    paired = couple(*(all_gather_rows(t.contiguous(), world) for t in (x0, x1, labels)), coupling)
    return paired[rank * n:(rank + 1) * n]


def training_loss(config, unet, prior, ddpm_scheduler, x1, conditioning, idx, ot_world: int = 1) -> tuple[torch.Tensor, float]:
    """One batch's loss and the mean |x1 - x0|^2 of the pairs it trained on.

    The prior always sees the true condition; guidance dropout hides it from the network only,
    as at sampling time, where both branches start from the same prior sample.
    """
    cond, prior_input, groups = conditioning.draw(idx, config["cfg_dropout"])
    model = conditional_model(unet, cond)
    x0 = couple_across_ranks(prior.sample(prior_input), x1, groups, config["coupling"], ot_world)
    cost = transport_cost(x0, x1).item()
    if config["method"] == "ddpm":
        return ddpm_loss(model, x0, x1, ddpm_scheduler), cost
    return flow_matching_loss(model, x0, x1, config["sigma_min"], config["time_sampling"]), cost


@torch.no_grad()
def validation_grid(config, unet, ema, prior, conditioning, codec, path: Path, device) -> None:
    """EMA samples at --num_steps NFE from a fixed generator: a row per class, or per caption
    (the first distinct training captions)."""
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    unet.eval()
    rows = min(config["num_classes"], 10) if config["condition"] == "class" else min(len(conditioning.table["pooled"]) - 1, 10)
    first = 0 if config["condition"] == "class" else 1  # caption 0 is the empty one
    cond, null, prior_input = conditioning.for_sampling(torch.arange(first, first + rows, device=device).repeat_interleave(8))
    x0 = prior.sample(prior_input, generator=torch.Generator(device).manual_seed(config["seed"]))
    model = conditional_model(unet, cond, null, config["cfg_scale"])
    x1, _, _ = generate(model, x0, config["method"], config["num_steps"], config["solver"], sampling_scheduler(config))
    save_image(decode_grid(codec, x1), path, nrow=8)
    unet.train()
    ema.restore(unet.parameters())


def load_training_state(path: Path, unet, ema, optimizer, lr_scheduler, device, rank: int, world: int) -> int:
    """Restore a checkpoint into the training objects; returns its step."""
    state = load_checkpoint(path, device)
    try:
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    except (KeyError, RuntimeError, ValueError) as err:
        raise UserError(f"checkpoint {path} does not fit this model: {str(err).splitlines()[0]}") from None
    ema.to(device)
    if len(state["rng"]) == world:  # one RNG state per rank; another world size reseeds instead
        set_rng_state(state["rng"][rank])
    return state["step"]


def any_rank(flag: bool, world: int, device) -> bool:
    """True when the flag is set on any rank, so that every rank takes the same branch."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@cli_entry
def main(args: argparse.Namespace) -> dict:
    rank, world = init_distributed()
    seed_everything(args.seed + rank)  # each rank draws its own noise; the data order uses args.seed
    device = pick_device(args.device)
    train_set = dataset_from_args(args, "train")
    codec = load_codec(args.vqvae_directory, train_set.channels, args.image_size)
    latents, labels = load_or_encode(codec, lambda: train_set, args, "train", device, rank, world)
    latents, labels = latents.to(device), labels.to(device)
    conditioning, text_dim = build_conditioning(args, train_set, labels, codec, device)
    config = run_config(args, codec, train_set, text_dim)
    prior = build_prior(config, codec, device)
    # As in diffusers' scripts, `latest` with no checkpoint yet starts a fresh run.
    resume = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint, required=args.resume_from_checkpoint != "latest") \
        if args.resume_from_checkpoint else None
    out = check_output_dir(args, config)
    if world > 1:
        dist.barrier()  # every rank has checked the folder before rank 0 writes into it
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", config)

    if len(latents) < args.batch_size * world:
        raise UserError(f"--batch_size {args.batch_size} x {world} processes exceeds the {len(latents)} training samples")
    max_steps = args.max_steps or args.num_train_epochs * (len(latents) // (args.batch_size * world))

    unet = build_unet(config["unet"]).to(device).train()
    if device.type == "cuda":
        unet = unet.to(memory_format=torch.channels_last)
    ema = EMAModel(unet.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=3 / 4)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=max_steps)
    ddpm_scheduler = training_scheduler(config)
    step = load_training_state(resume, unet, ema, optimizer, lr_scheduler, device, rank, world) if resume else 0
    if resume and rank == 0:
        print(f"resumed from {resume} at step {step}")
    # DDP keeps the parameters identical on every rank, so each rank's EMA is the same too.
    model = DistributedDataParallel(unet) if world > 1 else unet
    model = torch.compile(model) if args.compile else model

    def checkpoint() -> Path | None:
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if rank > 0:
            return None
        state = dict(unet=unet.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                     lr_scheduler=lr_scheduler.state_dict(), step=step, rng=rngs)
        return save_checkpoint(out, state, step, args.checkpoints_total_limit)

    log, last_log = [], time.perf_counter()
    progress = tqdm(total=max_steps, initial=step, desc=args.method, disable=rank > 0)
    metrics_file = open(out / "metrics.jsonl", "a" if resume else "w") if rank == 0 else None
    with StopSignal() as stop:
        while step < max_steps:
            idx = batch_indices(step, len(latents), args.batch_size, args.seed, rank, world)
            with autocast(device, args.mixed_precision):
                loss, cost = training_loss(config, model, prior, ddpm_scheduler, latents[idx], conditioning, idx,
                                           world if args.ot_global else 1)
            if any_rank(not torch.isfinite(loss).item(), world, device):
                raise UserError(f"loss is not finite ({loss.item()}) at step {step + 1}; stopped without updating the "
                                f"weights (the checkpoints in {out / 'checkpoints'} are intact)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), args.max_grad_norm)  # before the step
            optimizer.step()
            lr_scheduler.step()
            ema.step(unet.parameters())
            step += 1
            progress.update()
            log.append((loss.item(), cost))

            if rank == 0 and (step % args.logging_steps == 0 or step == max_steps):
                now = time.perf_counter()
                row = dict(step=step, loss=sum(l for l, _ in log) / len(log), coupling_cost=sum(c for _, c in log) / len(log),
                           lr=lr_scheduler.get_last_lr()[0], steps_per_sec=len(log) / (now - last_log))
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                progress.set_postfix(loss=f"{row['loss']:.4f}")
                log, last_log = [], now
            if rank == 0 and args.validation_steps and (step % args.validation_steps == 0 or step == max_steps):
                validation_grid(config, unet, ema, prior, conditioning, codec, out / f"samples-{step:08d}.png", device)
            stopping = any_rank(stop.received is not None, world, device)
            if step % args.checkpointing_steps == 0 or step == max_steps or stopping:
                path = checkpoint()
            if stopping:
                if rank == 0:
                    print(f"{stop.received or 'stop'} received: saved {path} at step {step}; "
                          "resume with --resume_from_checkpoint latest")
                break
    progress.close()
    if metrics_file:
        metrics_file.close()

    stopped = step < max_steps
    if rank == 0 and not stopped:
        ema.copy_to(unet.parameters())
        save_unet(unet, out / "unet")
        print(f"done: {step} steps; EMA network in {out / 'unet'}, metrics in {out / 'metrics.jsonl'}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"step": step, "output_dir": str(out), "stopped": stopped}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_args(parser)
    p = parser.add_argument_group("method")
    p.add_argument("--method", default="cpd", choices=tuple(METHODS))
    p.add_argument("--prior_dir", default=None, help="train_mapper.py output (cpd only)")
    p.add_argument("--sigma", type=float, default=None,
                   help="cpd prior noise scale: the class covariance factor's (default 1) or the text prior's (default 0.7)")
    p.add_argument("--weights_projector_path", default=None, help="text cpd: a mapper folder other than <prior_dir>/mapper")
    p.add_argument("--load_z", default=None, help="text cpd: a code bank other than <prior_dir>/z_final.safetensors")
    p.add_argument("--text_encoder", "--clip_model_name", default="minilm",
                   help="captions: minilm (shipped, offline) or a CLIP hub name / local folder")
    p.add_argument("--coupling", default=None, choices=COUPLINGS, help="override the method's coupling")
    p.add_argument("--sigma_min", type=float, default=0.01, help="noise added to x_t, as in the paper's code")
    p.add_argument("--time_sampling", default="uniform", choices=TIME_SAMPLINGS)
    p.add_argument("--cfg_dropout", type=float, default=0.1, help="probability of training on the null class")
    p.add_argument("--vqvae_directory", "--vqae_directory", default=None, help="saved VQ-VAE; omit for pixel space")
    n = parser.add_argument_group("network")
    n.add_argument("--unet_config", default=None, help="json file of UNet2DModel arguments")
    n.add_argument("--block_out_channels", default=None, help="e.g. 64,128 (attention on the last level)")
    n.add_argument("--layers_per_block", type=int, default=None)
    t = parser.add_argument_group("training")
    t.add_argument("--output_dir", default="runs/cpd-mnist")
    t.add_argument("--max_steps", type=int, default=None, help="overrides --num_train_epochs")
    t.add_argument("--num_train_epochs", type=int, default=1)
    t.add_argument("--batch_size", type=int, default=128)
    t.add_argument("--learning_rate", type=float, default=1e-3)
    t.add_argument("--weight_decay", type=float, default=0.0)
    t.add_argument("--lr_scheduler", default="constant_with_warmup", help="any diffusers get_scheduler name")
    t.add_argument("--lr_warmup_steps", type=int, default=100)
    t.add_argument("--max_grad_norm", type=float, default=1.0)
    t.add_argument("--ema_decay", type=float, default=0.999)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--mixed_precision", default="bf16", choices=("bf16", "no"), help="bf16 autocast on CUDA only")
    t.add_argument("--compile", action="store_true", help="torch.compile the network")
    t.add_argument("--ot_global", action="store_true",
                   help="under torchrun, solve BatchOT on the batch gathered from all ranks, not per GPU")
    t.add_argument("--device", default=None)
    c = parser.add_argument_group("checkpoints and logging")
    c.add_argument("--checkpointing_steps", type=int, default=500)
    c.add_argument("--checkpoints_total_limit", type=int, default=3)
    c.add_argument("--resume_from_checkpoint", default=None,
                   help="latest (starts fresh if the run has no checkpoint yet), or a checkpoint path")
    c.add_argument("--logging_steps", type=int, default=10)
    c.add_argument("--validation_steps", type=int, default=500, help="sample grid this often (0: never)")
    c.add_argument("--num_steps", type=int, default=15, help="NFE of the validation grids (the paper's flag)")
    c.add_argument("--solver", default="euler", choices=SOLVERS, help="solver of the validation grids")
    c.add_argument("--cfg_scale", type=float, default=1.0, help="guidance of the validation grids")
    args = parser.parse_args(argv)
    if args.method == "cpd" and not args.prior_dir:
        parser.error("--method cpd needs --prior_dir (the output of train_mapper.py)")
    return args


if __name__ == "__main__":
    main(parse_args())
