"""A minimal hand-written PyTorch VAE loop: the independent baseline for tests and the benchmark.

Deliberately shares no code with the harness (no vaerepro.model / likelihoods / estimators / Lightning):
the Bernoulli log-likelihood is `-binary_cross_entropy_with_logits`, the KL the closed form of AEVB's
Appendix B. If the harness and this loop disagree on the test ELBO, one of them is wrong.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F


class MinimalVAE(nn.Module):
    def __init__(self, data_dim: int, latent_dim: int, hidden: int):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(data_dim, hidden), nn.Tanh(), nn.Linear(hidden, 2 * latent_dim))
        self.dec = nn.Sequential(nn.Linear(latent_dim, hidden), nn.Tanh(), nn.Linear(hidden, data_dim))

    def elbo(self, x: torch.Tensor) -> torch.Tensor:
        """Per-example ELBO (B,) in nats, SGVB estimator B with one sample."""
        mu, logvar = self.enc(x).chunk(2, dim=-1)  # (B, Z) each
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        logits = self.dec(z)  # (B, D)
        log_px_z = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1)
        return log_px_z - kl


@dataclass
class BaselineResult:
    test_elbo: float
    test_elbo_se: float
    epoch_times: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)  # each optimiser step, data draw included


def train_minimal(
    x_train: torch.Tensor,
    x_val: torch.Tensor,
    x_test: torch.Tensor,
    *,
    latent_dim: int,
    hidden: int,
    epochs: int,
    batch_size: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    device: str = "cpu",
) -> BaselineResult:
    """Train on uint8 x_train (N, D) with dynamic binarisation; x_val/x_test are fixed binary draws (M, D).

    Every epoch also computes the validation ELBO, as the harness does, so epoch times are comparable.
    """
    torch.manual_seed(seed)
    model = MinimalVAE(x_train.shape[1], latent_dim, hidden).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    gd = torch.Generator(device=device).manual_seed(seed)
    x_train, x_val, x_test = (t.to(device) for t in (x_train, x_val, x_test))
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times, steps = [], []
    for _ in range(epochs):
        start = time.perf_counter()
        model.train()
        for idx in torch.randperm(len(x_train), generator=g).split(batch_size):
            t0 = time.perf_counter()
            p = x_train[idx.to(device)].float() / 255
            # the harness's draw (u < p is a Bernoulli(p) draw; torch.bernoulli is ~3x slower on a CPU), so
            # that the benchmark compares the loops' overheads, not two ways of binarising
            x = (torch.rand(p.shape, generator=gd, device=device) < p).float()
            loss = -model.elbo(x).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync()  # a GPU runs asynchronously: time the work, not its queueing
            steps.append(time.perf_counter() - t0)
        model.eval()
        with torch.no_grad():
            float(sum(model.elbo(v).sum() for v in x_val.split(batch_size)))
        times.append(time.perf_counter() - start)
    with torch.no_grad():
        e = torch.cat([model.elbo(v) for v in x_test.split(batch_size)])
    return BaselineResult(float(e.mean()), float(e.std() / len(e) ** 0.5), times, steps)
