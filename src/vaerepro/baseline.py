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


class MinimalLoop:
    """The loop, one epoch per ``epoch()`` call (the benchmark interleaves it with the harness's epochs).

    Trains on uint8 x_train (N, D) with dynamic binarisation; x_val is a fixed binary draw (M, D) whose ELBO
    every epoch computes, as the harness's validation does, so epoch times are comparable. ``fused``: torch's
    fused Adam kernel (the harness's default) instead of the default implementation.

    ``cuda_graph`` (CUDA only): the whole training step, binarisation, forward, backward and Adam's update
    (``capturable=True``: its step count stays on the device), captured once as one CUDA graph and replayed
    for every batch, the batch's indices copied into the graph's input first: the hand-written limit of a
    training step on a GPU, with no Python between its kernels. The data are on the device, the epoch's
    permutation is drawn there, and the random numbers come from the device's default generator (a graph
    replays its draws with a new offset each time). Only whole batches: a last partial one is dropped.
    """

    def __init__(
        self,
        x_train: torch.Tensor,
        x_val: torch.Tensor,
        *,
        latent_dim: int,
        hidden: int,
        batch_size: int = 100,
        lr: float = 1e-3,
        seed: int = 0,
        device: str = "cpu",
        fused: bool = False,
        cuda_graph: bool = False,
    ):
        torch.manual_seed(seed)
        self.model = MinimalVAE(x_train.shape[1], latent_dim, hidden).to(device)
        if cuda_graph and torch.device(device).type != "cuda":
            raise ValueError(f"cuda_graph needs a CUDA device, got {device!r}")
        # capturable: Adam's step count on the device, updated inside the graph (required for capture)
        adam = {"capturable": True} if cuda_graph else {"fused": fused}
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr, **adam)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.g = torch.Generator().manual_seed(seed)
        self.gd = torch.Generator(device=device).manual_seed(seed)
        self.x_train, self.x_val = x_train.to(device), x_val.to(device)
        self.batch_size, self.device = batch_size, device
        self.sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
        self.epoch_times: list[float] = []
        self.step_times: list[float] = []
        self.cuda_graph = cuda_graph

    def _graph_step(self) -> None:
        # one training step on the batch whose indices are in self.idx (B,), as the loop below writes it
        p = self.x_train.index_select(0, self.idx).float() / 255
        x = (torch.rand(p.shape, device=self.device) < p).float()
        loss = -self.model.elbo(x).mean()
        loss.backward()
        self.opt.step()

    def _capture(self) -> None:
        """Capture `_graph_step` as self.graph, after a few eager warm-up steps on a side stream (they create
        Adam's state and let the kernels pick their algorithms), as torch.cuda.graphs' documentation does;
        the gradients are allocated inside the graph, which writes them afresh at every replay. (The 3 warm-up
        steps train too: 3 steps more than the eager loops, on a few hundred.)"""
        self.idx = torch.arange(self.batch_size, device=self.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.opt.zero_grad(set_to_none=True)
                self._graph_step()
        torch.cuda.current_stream().wait_stream(side)
        self.opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._graph_step()

    def _graph_epoch(self) -> None:
        if self.graph is None:
            self._capture()
        n = len(self.x_train) - len(self.x_train) % self.batch_size  # whole batches
        order = torch.randperm(len(self.x_train), generator=self.gd, device=self.device)[:n]
        t0 = time.perf_counter()
        for idx in order.split(self.batch_size):
            self.idx.copy_(idx)
            self.graph.replay()
        self.sync()  # the replays are queued: the epoch's steps are done here
        self.step_times += [(time.perf_counter() - t0) / (n // self.batch_size)] * (n // self.batch_size)

    def epoch(self) -> float:
        """Train one epoch and compute the validation ELBO; returns the seconds it took."""
        start = time.perf_counter()
        self.model.train()
        if self.cuda_graph:
            self._graph_epoch()
        else:
            self._eager_epoch()
        self.model.eval()
        with torch.no_grad():
            float(sum(self.model.elbo(v).sum() for v in self.x_val.split(self.batch_size)))
        self.epoch_times.append(time.perf_counter() - start)
        return self.epoch_times[-1]

    def _eager_epoch(self) -> None:
        for idx in torch.randperm(len(self.x_train), generator=self.g).split(self.batch_size):
            t0 = time.perf_counter()
            p = self.x_train[idx.to(self.device)].float() / 255
            # the harness's draw (u < p is a Bernoulli(p) draw; torch.bernoulli is ~3x slower on a CPU), so
            # that the benchmark compares the loops' overheads, not two ways of binarising
            x = (torch.rand(p.shape, generator=self.gd, device=self.device) < p).float()
            loss = -self.model.elbo(x).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sync()  # a GPU runs asynchronously: time the work, not its queueing
            self.step_times.append(time.perf_counter() - t0)

    @torch.no_grad()
    def test_elbo(self, x_test: torch.Tensor) -> tuple[float, float]:
        """Mean and standard error of the ELBO over x_test (a fixed binary draw), nats."""
        e = torch.cat([self.model.elbo(v) for v in x_test.to(self.device).split(self.batch_size)])
        return float(e.mean()), float(e.std() / len(e) ** 0.5)


def train_minimal(
    x_train: torch.Tensor, x_val: torch.Tensor, x_test: torch.Tensor, *, epochs: int, **loop_options
) -> BaselineResult:
    """Train ``MinimalLoop(x_train, x_val, **loop_options)`` for ``epochs`` and return the test ELBO with the
    epoch and step times."""
    loop = MinimalLoop(x_train, x_val, **loop_options)
    for _ in range(epochs):
        loop.epoch()
    return BaselineResult(*loop.test_elbo(x_test), loop.epoch_times, loop.step_times)
