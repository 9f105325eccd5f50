"""The whole training step as one CUDA graph (trainer.cuda_graph=true).

A small model's training step is a few hundred microseconds of GPU work behind a few milliseconds of
Python (the objective's distributions, autograd, the optimiser, Lightning's loop), so the GPU mostly waits.
Captured once with torch.cuda.graph and replayed for every batch, the step's kernels launch as one graph.

Captured: the objective's forward pass on fixed input buffers, the backward pass, gradient clipping and
the optimiser's update: torch's Adam with capturable=True, or torch's fused Adagrad (both keep their step
counts on the device and never read them on the host). Eager, as without
the graph: the batch's random draws (its data-space draw and q's noise, from the batch's seeded generator,
then copied into the graph's inputs, so a graph step sees exactly the eager step's numbers), Lightning's
loop with its optimiser-step bookkeeping (global_step, on_before_optimizer_step), the first steps (the
warm-up torch's documentation asks for before a capture), and any batch of another size (a last partial
batch). Lightning's backward hooks (on_before_backward, on_after_backward) do not run for graph steps.

Written here because neither library does it: Lightning has no CUDA-graph support of its own, and
torch.compile(mode="reduce-overhead") graphs the objective's forward and backward but not the optimiser's
step nor the Python around them (docs/performance.md's GPU table has both).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

# Eager steps on full batches before the capture, on a side stream (torch.cuda.graphs' documentation: the
# warm-up creates the optimiser's state and lets the libraries set themselves up outside the capture).
WARMUP_STEPS = 3


class Replaying:
    """A torch optimiser (mixed in before it) whose step() replays a captured training step while
    `replaying(graph)` is active: Lightning's optimizer.step(), which counts global_step and runs the
    on_before_optimizer_step hooks, then runs the whole graph instead of the update alone. Outside
    `replaying`, the optimiser's own step (the warm-up, the capture, partial batches)."""

    replay: Callable[[], None] | None = None  # the graph's replay while `replaying`

    def step(self, closure=None):
        if self.replay is None:
            return super().step(closure)
        if closure is not None:  # Lightning's: runs its hooks before the step, as for any optimiser
            with torch.enable_grad():
                closure()
        self.replay()
        return None

    @contextlib.contextmanager
    def replaying(self, graph: torch.cuda.CUDAGraph) -> Iterator[None]:
        self.replay = graph.replay
        try:
            yield
        finally:
            self.replay = None


class CapturableAdam(Replaying, torch.optim.Adam):
    """torch.optim.Adam with capturable=True (foreach kernels; its step count a device tensor)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, capturable=True, foreach=True, **kwargs)

    def load_state_dict(self, state_dict: dict) -> None:
        # torch copies the saved param groups' settings over these: a checkpoint of an eager training holds
        # fused=True, capturable=False, which a captured step refuses. The state itself (moments, step
        # counts) is the same in both, and torch moves the step counts to the device for capturable.
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.update(capturable=True, foreach=True, fused=None)


class CapturableAdagrad(Replaying, torch.optim.Adagrad):
    """torch.optim.Adagrad with fused=True: one kernel reads each step count from the device (the foreach
    and per-tensor updates read it on the host, which a graph would freeze at its capture). torch's Adagrad
    has no capturable flag; its fused update is the eager training's own (train.fused, the default), so a
    graph step runs the same kernel on the same state. torch 2.11 has that kernel for the CPU only (2.13's
    Python no longer excludes CUDA): without it the steps run eagerly (train.VAEModule._eager_because)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, fused=True, **kwargs)

    def load_state_dict(self, state_dict: dict) -> None:
        # a checkpoint of an eager training with train.fused=false holds fused=False and its step counts on
        # the host, where torch leaves them for that setting: fused, on the parameters' device, as fused
        # Adagrad's own state is (torch.optim.Adagrad._init_group)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.update(fused=True, foreach=None)
            for p in group["params"]:
                if "step" in self.state.get(p, {}):
                    self.state[p]["step"] = self.state[p]["step"].to(p.device, torch.float32)


class StepGraph:
    """A training step on batches of `batch_size` examples as one CUDA graph, captured after WARMUP_STEPS
    eager steps on such batches, and again whenever the learning rates change (a schedule's epoch: the
    optimiser's captured kernels hold the rate as a number).

    `loss_fn(x, eps)`: the step's loss (a scalar) and per-example bound (B,) for x (N, D) in the data space
    and q's noise eps (K, N, Z), run at capture; `params`: the parameters whose gradients `clip` bounds
    (element-wise to [-clip, clip], as the eager step's Lightning clip_gradients does).
    """

    def __init__(
        self,
        loss_fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
        batch_size: int,
        params: Sequence[Tensor],
        clip: float | None = None,
    ):
        self.loss_fn, self.batch_size, self.params, self.clip = loss_fn, batch_size, list(params), clip
        self.warm = 0  # eager full-batch steps taken so far
        self.graph: torch.cuda.CUDAGraph | None = None
        self.rates: list[float] | None = None  # the learning rates the graph was captured with
        self.captures = 0
        self.replays = 0
        self.x = self.eps = None  # the graph's inputs, (N, D) and (K, N, Z)
        self.loss = self.bound = None  # its outputs: the loss and the per-example bound (B,)

    def takes(self, n: int) -> bool:
        """Whether a batch of n examples runs as the graph (else eagerly)."""
        return n == self.batch_size and self.warm >= WARMUP_STEPS

    @contextlib.contextmanager
    def eager_step(self, n: int) -> Iterator[None]:
        """Around an eager step on n examples: a full batch's before the capture runs on a side stream and
        counts towards the warm-up."""
        if n != self.batch_size or self.warm >= WARMUP_STEPS:
            yield
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream().wait_stream(side)
        self.warm += 1

    def step(self, x: Tensor, eps: Tensor, optimizer) -> tuple[Tensor, Tensor]:
        """One training step on x (N, D) and eps (K, N, Z) through `optimizer` (Lightning's wrapper of a
        CapturableAdam or CapturableAdagrad, or the optimiser itself): its loss, a copy (Lightning hands it
        to callbacks, which may keep it), and its per-example bound (B,), the graph's own, valid until the
        next step."""
        opt = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer.optimizer: the torch one
        rates = [group["lr"] for group in opt.param_groups]
        if self.graph is None or rates != self.rates:
            self._capture(x, eps, opt)
            self.rates = rates
        self.x.copy_(x)
        self.eps.copy_(eps)
        with opt.replaying(self.graph):
            optimizer.step()
        self.replays += 1
        return self.loss.clone(), self.bound

    def _capture(self, x: Tensor, eps: Tensor, opt: Replaying) -> None:
        self.graph = self.loss = self.bound = None  # an earlier graph's memory goes back first
        self.x, self.eps = x.clone(), eps.clone()
        # the graph allocates the gradients and writes them afresh at each replay
        opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss, bound = self.loss_fn(self.x, self.eps)
            loss.backward()
            if self.clip is not None:
                torch.nn.utils.clip_grad_value_(self.params, self.clip)
            opt.step()
        self.graph, self.loss, self.bound = graph, loss.detach(), bound.detach()
        self.captures += 1
