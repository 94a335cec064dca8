"""The flow-matching core: priors, couplings, the probability path and its loss, ODE solvers.

Conventions: x0 is a prior sample, x1 a data latent, t runs from 0 (prior) to 1 (data), and
x_t = (1 - t) x0 + t x1 with target velocity x1 - x0. Networks see t * TIME_SCALE, the range
diffusers' sinusoidal timestep embedding was built for. A "velocity" is any callable
v(x, t) with t a (batch,) tensor in [0, 1].
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy.optimize import linear_sum_assignment

from training_utils import UserError, atomic_write, write_json

TIME_SCALE = 1000.0
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# ---------------------------------------------------------------------------------------------
# Priors
# ---------------------------------------------------------------------------------------------


class StandardNormalPrior:
    """N(0, I), whatever the condition."""

    def __init__(self, latent_shape: tuple[int, ...]):
        self.latent_shape = tuple(latent_shape)

    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn((len(labels), *self.latent_shape), generator=generator, device=labels.device)


COVARIANCES = ("isotropic", "diag", "lowrank", "full")


class ClassGaussianPrior:
    """One Gaussian per class: x0 = mu_c + scale * L_c eps, with L_c L_c^T the class covariance.

    The covariance is stored in the cheapest form its kind allows: `std` (C, 1) for isotropic,
    `std` (C, D) for diag, `factor` (C, D, K) plus `std` (C, D) for low rank plus diagonal,
    and the Cholesky factor `cholesky` (C, D, D) for full.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict, scale: float = 1.0):
        self.tensors = tensors
        self.config = config
        self.scale = scale
        self.latent_shape = tuple(config["latent_shape"])
        self.num_classes = config["num_classes"]

    @property
    def means(self) -> torch.Tensor:
        return self.tensors["means"]

    def to(self, device: torch.device | str) -> "ClassGaussianPrior":
        self.tensors = {k: v.to(device) for k, v in self.tensors.items()}
        return self

    def check_labels(self, labels: torch.Tensor) -> None:
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)][0].item()
            raise UserError(f"label {bad} is outside the prior's classes 0..{self.num_classes - 1}")

    def noise(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """L_c eps, flattened to (B, D)."""
        t, n, d = self.tensors, len(labels), self.means[0].numel()
        eps = torch.randn(n, d, generator=generator, device=labels.device)
        if "cholesky" in t:
            return torch.einsum("bij,bj->bi", t["cholesky"][labels], eps)
        out = t["std"][labels] * eps
        if "factor" in t:
            factor = t["factor"][labels]
            eps_k = torch.randn(n, factor.shape[-1], generator=generator, device=labels.device)
            out = out + torch.einsum("bik,bk->bi", factor, eps_k)
        return out

    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        self.check_labels(labels)
        noise = self.noise(labels, generator).view(len(labels), *self.latent_shape)
        return self.means[labels] + self.scale * noise

    def covariance(self, c: int) -> torch.Tensor:
        """The (D, D) covariance of class c, as sampling realises it (before `scale`)."""
        t = self.tensors
        if "cholesky" in t:
            return t["cholesky"][c] @ t["cholesky"][c].T
        d = self.means[0].numel()
        cov = torch.diag(t["std"][c].expand(d) ** 2)
        if "factor" in t:
            cov = cov + t["factor"][c] @ t["factor"][c].T
        return cov

    def trace(self) -> torch.Tensor:
        """tr(Sigma_c) for every class, (C,)."""
        t, d = self.tensors, self.means[0].numel()
        if "cholesky" in t:
            return t["cholesky"].pow(2).sum((1, 2))
        tr = t["std"].pow(2).sum(1) * (d if t["std"].shape[1] == 1 else 1)
        return tr + t["factor"].pow(2).sum((1, 2)) if "factor" in t else tr

    def save(self, directory: str | Path, extra_config: dict | None = None) -> None:
        directory = Path(directory)
        tensors = {k: v.contiguous().cpu() for k, v in self.tensors.items()}
        atomic_write(directory / "prior.safetensors", lambda tmp: save_file(tensors, tmp))
        write_json(directory / "prior.json", {**self.config, **(extra_config or {})})

    @classmethod
    def load(cls, directory: str | Path, scale: float = 1.0) -> "ClassGaussianPrior":
        directory = Path(directory)
        if not (directory / "prior.safetensors").is_file() or not (directory / "prior.json").is_file():
            raise UserError(f"no prior in {directory}: expected prior.safetensors and prior.json (run train_mapper.py)")
        config = json.loads((directory / "prior.json").read_text())
        return cls(load_file(directory / "prior.safetensors"), config, scale)

    @classmethod
    def fit(
        cls,
        latents: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        covariance: str = "diag",
        rank: int = 16,
        shrinkage: float = 0.05,
    ) -> "ClassGaussianPrior":
        """Per-class means and covariances, shrunk towards (trace / D) I so none is singular.

        With S the unbiased sample covariance and m = tr(S) / D, the stored covariance is
        (1 - shrinkage) S + shrinkage m I (full); its diagonal (diag); m (isotropic); and for
        lowrank the top-`rank` principal directions of S plus the remaining diagonal, shrunk alike.
        """
        if covariance not in COVARIANCES:
            raise UserError(f"unknown covariance {covariance!r}; choose from {', '.join(COVARIANCES)}")
        flat = latents.flatten(1).double()
        stats = [_class_statistics(flat[labels == c], c, covariance, rank, shrinkage) for c in range(num_classes)]
        tensors = {k: torch.stack([s[k] for s in stats]).float() for k in stats[0]}
        tensors["means"] = tensors["means"].view(num_classes, *latents.shape[1:])
        tensors["counts"] = torch.bincount(labels, minlength=num_classes)
        config = dict(
            latent_shape=list(latents.shape[1:]), num_classes=num_classes, covariance=covariance,
            rank=rank if covariance == "lowrank" else None, shrinkage=shrinkage,
        )
        return cls(tensors, config)


def _class_statistics(x: torch.Tensor, c: int, covariance: str, rank: int, shrinkage: float) -> dict:
    if len(x) < 2:
        raise UserError(f"class {c} has {len(x)} training samples; at least 2 are needed to fit its Gaussian")
    mean = x.mean(0)
    centred = x - mean
    var = centred.pow(2).sum(0) / (len(x) - 1)
    m = var.mean()
    if covariance == "isotropic":
        return {"means": mean, "std": m.sqrt()[None]}
    if covariance == "diag":
        return {"means": mean, "std": ((1 - shrinkage) * var + shrinkage * m).sqrt()}
    if covariance == "full":
        cov = centred.T @ centred / (len(x) - 1)
        cov = (1 - shrinkage) * cov + shrinkage * m * torch.eye(len(mean), dtype=cov.dtype)
        return {"means": mean, "cholesky": torch.linalg.cholesky(cov)}
    # Low rank plus diagonal: the top-k principal directions keep their variance exactly and
    # the diagonal makes up the rest of each coordinate's variance.
    k = min(rank, len(x) - 1, len(mean))
    _, s, v = torch.linalg.svd(centred, full_matrices=False)
    factor = v[:k].T * (s[:k] / math.sqrt(len(x) - 1))
    residual = (var - factor.pow(2).sum(1)).clamp_min(0)
    factor = factor * math.sqrt(1 - shrinkage)
    if k < rank:  # pad so every class has the same shape
        factor = F.pad(factor, (0, rank - k))
    return {"means": mean, "factor": factor, "std": ((1 - shrinkage) * residual + shrinkage * m).sqrt()}


class MapperPrior:
    """The text prior: x0 = mapper(text[, z]) + sigma * eps (the paper's sigma is 0.7).

    With the noise-projector variant (dim_z > 0), z is drawn per dimension from a Gaussian
    fitted to the bank of codes learned in training.
    """

    def __init__(self, mapper: torch.nn.Module, sigma: float, z_bank: torch.Tensor | None = None):
        self.mapper, self.sigma = mapper.eval(), sigma
        self.latent_shape = tuple(mapper.config.latent_shape)
        self.z_mean = z_bank.mean(0) if z_bank is not None else None
        self.z_std = z_bank.std(0) if z_bank is not None else None

    def to(self, device: torch.device | str) -> "MapperPrior":
        self.mapper.to(device)
        if self.z_mean is not None:
            self.z_mean, self.z_std = self.z_mean.to(device), self.z_std.to(device)
        return self

    def draw_z(self, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor | None:
        if self.z_mean is None:
            return None
        return self.z_mean + self.z_std * torch.randn(n, len(self.z_mean), generator=generator, device=device)

    @torch.no_grad()
    def sample(self, text: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mean = self.mapper(text, self.draw_z(len(text), text.device, generator))
        return mean + self.sigma * torch.randn(mean.shape, generator=generator, device=text.device)

    @classmethod
    def load(cls, directory: str | Path, sigma: float | None = None, mapper_path: str | None = None,
             z_path: str | None = None) -> "MapperPrior":
        """train_mapper.py's output; mapper_path / z_path (the paper's --weights_projector_path
        and --load_z) take the mapper and the code bank from elsewhere."""
        from neural_models import TextMapper

        directory = Path(directory)
        mapper_path, z_path = Path(mapper_path or directory / "mapper"), Path(z_path or directory / "z_final.safetensors")
        if not (directory / "prior.json").is_file() or not (mapper_path / "config.json").is_file():
            raise UserError(f"no text prior in {directory}: expected prior.json and a mapper folder "
                            "(train_mapper.py --condition text)")
        config = json.loads((directory / "prior.json").read_text())
        if config.get("dim_z") and not z_path.is_file():
            raise UserError(f"the mapper takes a {config['dim_z']}-dim code but the bank {z_path} is missing")
        bank = load_file(z_path)["z"] if config.get("dim_z") else None
        prior = cls(TextMapper.from_pretrained(mapper_path, low_cpu_mem_usage=False),
                    config["sigma"] if sigma is None else sigma, bank)
        prior.config = config
        return prior


def transport_cost(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Mean over samples of |x1 - x0|^2, the squared L2 norm summed over all non-batch dims.

    With x0 prior samples and x1 where the ODE takes them, this is the paper's transport cost;
    with the pairs drawn in training, it is the coupling cost.
    """
    return (x1 - x0).flatten(1).pow(2).sum(1).mean()


def independent_transport_cost(x1: torch.Tensor, x0_mean: torch.Tensor, x0_trace: torch.Tensor) -> float:
    """E|x1 - x0|^2 under independent pairing: |x1 - E x0|^2 + tr Cov(x0), averaged over x1."""
    return ((x1 - x0_mean).flatten(1).pow(2).sum(1) + x0_trace).mean().item()


# ---------------------------------------------------------------------------------------------
# Couplings: which prior sample each data point is paired with
# ---------------------------------------------------------------------------------------------

COUPLINGS = ("independent", "ot", "class_ot")


def ot_permutation(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """perm minimising sum_i |x1_i - x0_perm[i]|^2 exactly: a true permutation, no resampling."""
    cost = torch.cdist(x1.flatten(1).float(), x0.flatten(1).float()).pow(2)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.from_numpy(cols[np.argsort(rows)]).to(x0.device)


def couple(x0: torch.Tensor, x1: torch.Tensor, labels: torch.Tensor, coupling: str) -> torch.Tensor:
    """Reorder x0 so that x0[i] is the prior sample paired with x1[i] (x1 and labels keep order)."""
    if coupling == "independent":
        return x0
    if coupling == "ot":
        return x0[ot_permutation(x0, x1)]
    if coupling == "class_ot":
        out = x0.clone()
        for c in labels.unique():
            idx = (labels == c).nonzero().squeeze(1)
            out[idx] = x0[idx][ot_permutation(x0[idx], x1[idx])]
        return out
    raise UserError(f"unknown coupling {coupling!r}; choose from {', '.join(COUPLINGS)}")


# ---------------------------------------------------------------------------------------------
# The path and the loss
# ---------------------------------------------------------------------------------------------

TIME_SAMPLINGS = ("uniform", "logit_normal")


def sample_time(n: int, device: torch.device, schedule: str = "uniform") -> torch.Tensor:
    if schedule == "uniform":
        return torch.rand(n, device=device)
    if schedule == "logit_normal":  # more weight mid-path, as in SD3
        return torch.sigmoid(torch.randn(n, device=device))
    raise UserError(f"unknown time sampling {schedule!r}; choose from {', '.join(TIME_SAMPLINGS)}")


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, sigma_min: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t on the straight path (plus sigma_min noise, as in the paper's code) and its velocity."""
    tt = t.view(-1, *[1] * (x0.dim() - 1))
    xt = (1 - tt) * x0 + tt * x1
    if sigma_min > 0:
        xt = xt + sigma_min * torch.randn_like(xt)
    return xt, x1 - x0


def flow_matching_loss(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    x1: torch.Tensor,
    sigma_min: float = 0.0,
    time_sampling: str = "uniform",
) -> torch.Tensor:
    """MSE between model(x_t, t * TIME_SCALE) and x1 - x0."""
    t = sample_time(len(x1), x1.device, time_sampling)
    xt, target = interpolate(x0, x1, t, sigma_min)
    return F.mse_loss(model(xt, t * TIME_SCALE).float(), target)


# ---------------------------------------------------------------------------------------------
# ODE solvers
# ---------------------------------------------------------------------------------------------

# Network evaluations per step of each fixed-step method.
STAGES = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
SOLVERS = (*STAGES, "dopri5")


def _step(method: str, v: Velocity, x: torch.Tensor, t: float, h: float) -> torch.Tensor:
    tt = lambda s: torch.full((len(x),), s, device=x.device, dtype=x.dtype)  # noqa: E731
    if method == "euler":
        return x + h * v(x, tt(t))
    if method == "midpoint":
        return x + h * v(x + h / 2 * v(x, tt(t)), tt(t + h / 2))
    if method == "heun":
        k1 = v(x, tt(t))
        k2 = v(x + h * k1, tt(t + h))
        return x + h / 2 * (k1 + k2)
    k1 = v(x, tt(t))
    k2 = v(x + h / 2 * k1, tt(t + h / 2))
    k3 = v(x + h / 2 * k2, tt(t + h / 2))
    k4 = v(x + h * k3, tt(t + h))
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def step_plan(solver: str, nfe: int) -> list[str]:
    """The methods of each step so that the steps use exactly `nfe` evaluations.

    nfe // stages steps of the solver, then the nfe % stages evaluations left over as Euler
    steps (as EDM ends its Heun sampler with an Euler step), all on a uniform grid.
    """
    if solver not in STAGES:
        raise UserError(f"unknown fixed-step solver {solver!r}; choose from {', '.join(SOLVERS)}")
    if nfe <= 0:
        raise UserError(f"--nfe must be positive, got {nfe}")
    return [solver] * (nfe // STAGES[solver]) + ["euler"] * (nfe % STAGES[solver])


class CountingVelocity:
    """Counts network evaluations (one per call, whatever the batch)."""

    def __init__(self, velocity: Velocity):
        self.velocity, self.calls = velocity, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.velocity(x, t)


@torch.no_grad()
def integrate(
    velocity: Velocity,
    x0: torch.Tensor,
    nfe: int = 15,
    solver: str = "euler",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    return_path: bool = False,
) -> tuple[torch.Tensor, int, list[tuple[float, torch.Tensor]] | None]:
    """Integrate dx/dt = v(x, t) from t = 0 to exactly t = 1.

    Fixed-step solvers use exactly `nfe` evaluations; dopri5 (torchdiffeq) adapts its steps to
    rtol/atol and ignores `nfe`. Returns (x1, evaluations used, [(t, x_t), ...] or None).
    """
    counted = CountingVelocity(velocity)
    if solver == "dopri5":
        from torchdiffeq import odeint

        times = torch.linspace(0, 1, 11 if return_path else 2, device=x0.device)
        xs = odeint(lambda t, x: counted(x, t.expand(len(x))), x0, times, method="dopri5", rtol=rtol, atol=atol)
        path = list(zip(times.tolist(), xs)) if return_path else None
        return xs[-1], counted.calls, path
    plan = step_plan(solver, nfe)
    x, path = x0, [(0.0, x0)] if return_path else None
    for i, method in enumerate(plan):
        t, t_next = i / len(plan), (i + 1) / len(plan)
        x = _step(method, counted, x, t, t_next - t)
        if path is not None:
            path.append((t_next, x))
    return x, counted.calls, path


# ---------------------------------------------------------------------------------------------
# DDPM baseline: epsilon prediction, sampled with DDIM at the same NFE budget
# ---------------------------------------------------------------------------------------------


def ddpm_loss(model: Callable, noise: torch.Tensor, x1: torch.Tensor, scheduler) -> torch.Tensor:
    """diffusers' DDPM objective: predict the noise added at a random timestep."""
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(x1),), device=x1.device)
    noisy = scheduler.add_noise(x1, noise, timesteps)
    return F.mse_loss(model(noisy, timesteps).float(), noise)


@torch.no_grad()
def ddim_sample(model: Callable, noise: torch.Tensor, nfe: int, scheduler) -> tuple[torch.Tensor, int]:
    """Deterministic DDIM (eta = 0) from `noise` in exactly `nfe` network evaluations."""
    if nfe <= 0:
        raise UserError(f"--nfe must be positive, got {nfe}")
    scheduler.set_timesteps(nfe, device=noise.device)
    x = noise
    for t in scheduler.timesteps:
        eps = model(x, t.expand(len(x)))
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x, len(scheduler.timesteps)


def generate(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    method: str,
    nfe: int,
    solver: str = "euler",
    scheduler=None,
    return_path: bool = False,
) -> tuple[torch.Tensor, int, list | None]:
    """Carry prior samples x0 to data latents: the flow ODE, or DDIM for the ddpm baseline."""
    if method == "ddpm":
        x1, used = ddim_sample(model, x0, nfe, scheduler)
        return x1, used, None
    return integrate(lambda x, t: model(x, t * TIME_SCALE), x0, nfe, solver, return_path=return_path)
