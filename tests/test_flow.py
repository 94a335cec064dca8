import itertools

import numpy as np
import pytest
import torch

from flow import (
    COVARIANCES, STAGES, ClassGaussianPrior, couple, ddim_sample, flow_matching_loss, integrate, ot_permutation,
    step_plan,
)
from training_utils import UserError


def toy_latents(n_per_class=200, num_classes=3, shape=(2, 2, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    d = int(np.prod(shape))
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    mix = torch.randn(num_classes, d, d, generator=g) / d**0.5
    x = torch.randn(len(labels), d, generator=g)
    x = torch.einsum("nij,nj->ni", mix[labels], x) + 3 * torch.randn(num_classes, d, generator=g)[labels]
    return x.view(-1, *shape), labels


@pytest.mark.parametrize("kind", COVARIANCES)
def test_prior_statistics_match_numpy(kind):
    x, y = toy_latents()
    shrink = 0.1
    prior = ClassGaussianPrior.fit(x, y, 3, kind, rank=3, shrinkage=shrink)
    for c in range(3):
        xc = x[y == c].flatten(1).double().numpy()
        s = np.cov(xc, rowvar=False)
        m = np.trace(s) / len(s)
        np.testing.assert_allclose(prior.means[c].flatten().numpy(), xc.mean(0), rtol=1e-5, atol=1e-5)
        cov = prior.covariance(c).double().numpy()
        if kind == "full":
            expected = (1 - shrink) * s + shrink * m * np.eye(len(s))
            np.testing.assert_allclose(cov, expected, rtol=1e-4, atol=1e-5)
        elif kind == "diag":
            np.testing.assert_allclose(cov, np.diag((1 - shrink) * np.diag(s) + shrink * m), rtol=1e-4, atol=1e-5)
        elif kind == "isotropic":
            np.testing.assert_allclose(cov, m * np.eye(len(s)), rtol=1e-4)
        else:  # low rank: top-3 principal directions with their variance, plus the diagonal remainder
            vals, vecs = np.linalg.eigh(s)
            low = (vecs[:, -3:] * vals[-3:]) @ vecs[:, -3:].T
            rest = np.clip(np.diag(s) - np.diag(low), 0, None)
            expected = (1 - shrink) * (low + np.diag(rest)) + shrink * m * np.eye(len(s))
            np.testing.assert_allclose(cov, expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(prior.trace()[c].item(), np.trace(cov), rtol=1e-4)


@pytest.mark.parametrize("kind", COVARIANCES)
def test_prior_samples_have_the_fitted_moments(kind):
    x, y = toy_latents()
    prior = ClassGaussianPrior.fit(x, y, 3, kind, rank=3)
    torch.manual_seed(0)
    labels = torch.full((40000,), 1)
    s = prior.sample(labels).flatten(1).double()
    assert torch.allclose(s.mean(0), prior.means[1].flatten().double(), atol=0.05)
    assert torch.allclose(torch.cov(s.T), prior.covariance(1).double(), atol=0.08)
    prior.scale = 0.5
    s = prior.sample(labels).flatten(1).double()
    assert torch.allclose(torch.cov(s.T), 0.25 * prior.covariance(1).double(), atol=0.04)


def test_prior_round_trips_through_safetensors(tmp_path):
    x, y = toy_latents()
    prior = ClassGaussianPrior.fit(x, y, 3, "lowrank", rank=2)
    prior.save(tmp_path, {"codec": "abc"})
    loaded = ClassGaussianPrior.load(tmp_path, scale=0.7)
    assert loaded.config["codec"] == "abc" and loaded.scale == 0.7 and loaded.means.shape == (3, 2, 2, 2)
    for k, v in prior.tensors.items():
        assert torch.equal(loaded.tensors[k], v)


def test_prior_rejects_unknown_labels():
    x, y = toy_latents()
    prior = ClassGaussianPrior.fit(x, y, 3, "diag")
    with pytest.raises(UserError, match="label 3 is outside"):
        prior.sample(torch.tensor([0, 3]))


@pytest.mark.parametrize("n", [2, 4, 6])
def test_ot_coupling_is_an_optimal_permutation(n):
    g = torch.Generator().manual_seed(n)
    x0, x1 = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)
    perm = ot_permutation(x0, x1)
    assert sorted(perm.tolist()) == list(range(n))
    cost = lambda p: (x1 - x0[torch.as_tensor(p)]).pow(2).sum().item()  # noqa: E731
    best = min(cost(p) for p in itertools.permutations(range(n)))
    assert cost(perm) == pytest.approx(best, rel=1e-5)
    assert torch.equal(couple(x0, x1, torch.zeros(n), "ot"), x0[perm])


def test_class_aware_ot_never_pairs_across_classes():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    x0 = torch.randn(10, 4, generator=g) + labels[:, None] * 100.0  # each prior sample tagged by its class
    x1 = torch.randn(10, 4, generator=g) - labels[:, None] * 100.0  # plain OT would swap classes
    paired = couple(x0, x1, labels, "class_ot")
    assert torch.equal((paired[:, 0] / 100).round().long(), labels)
    assert sorted(paired[:, 1].tolist()) == sorted(x0[:, 1].tolist())


def linear_ode(x, t):
    """dx/dt = -x + t, whose solution is x(t) = t - 1 + (x0 + 1) e^-t."""
    return -x + t.view(-1, *[1] * (x.dim() - 1))


def exact_linear(x0):
    return (x0 + 1) * np.exp(-1.0)


@pytest.mark.parametrize("solver, order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_solvers_use_exactly_nfe_and_converge_at_their_order(solver, order):
    x0 = torch.tensor([[0.5], [-1.0]], dtype=torch.float64)
    errors = []
    for nfe in (STAGES[solver] * 4, STAGES[solver] * 8):
        x1, used, path = integrate(linear_ode, x0, nfe, solver, return_path=True)
        assert used == nfe and path[-1][0] == 1.0
        errors.append((x1 - exact_linear(x0)).abs().max().item())
    assert np.log2(errors[0] / errors[1]) == pytest.approx(order, abs=0.3)


@pytest.mark.parametrize("solver, nfe", [("midpoint", 15), ("rk4", 15), ("heun", 1), ("euler", 1)])
def test_odd_budgets_still_use_exactly_nfe_and_reach_t1(solver, nfe):
    calls = []
    _, used, path = integrate(lambda x, t: calls.append(t[0].item()) or torch.ones_like(x), torch.zeros(2, 1), nfe, solver,
                              return_path=True)
    assert used == len(calls) == nfe and path[-1][0] == 1.0
    assert max(calls) < 1.0 + 1e-9  # never evaluates past the end of the interval
    assert torch.allclose(path[-1][1], torch.ones(2, 1))  # constant velocity 1 integrated over exactly [0, 1]


def test_adaptive_solver_reports_its_evaluations():
    x0 = torch.tensor([[0.5]], dtype=torch.float64)
    x1, used, _ = integrate(linear_ode, x0, solver="dopri5")
    assert used > 5 and torch.allclose(x1, exact_linear(x0), atol=1e-5)


def test_bad_solver_arguments_are_user_errors():
    with pytest.raises(UserError, match="nfe"):
        step_plan("euler", 0)
    with pytest.raises(UserError, match="unknown"):
        step_plan("leapfrog", 4)


def test_flow_matching_loss_decreases_on_a_tiny_problem():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.SiLU(), torch.nn.Linear(64, 2))
    model = lambda x, t: net(torch.cat([x, t[:, None] / 1000], 1))  # noqa: E731
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(300):
        x1 = torch.randn(256, 2) * 0.1 + torch.tensor([2.0, -1.0])
        loss = flow_matching_loss(model, torch.randn(256, 2), x1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-30:]) < 0.5 * np.mean(losses[:30])


def test_ddim_uses_exactly_nfe_evaluations():
    from diffusers import DDIMScheduler

    calls = []
    x, used = ddim_sample(lambda x, t: calls.append(int(t[0])) or torch.zeros_like(x), torch.randn(2, 3), 7,
                          DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing"))
    assert used == len(calls) == 7 and calls[0] == 999
