"""Flatness of a trained network's minimum, on a fixed subset of its training data.

Every measure is of the mean cross-entropy ``L(theta)`` of one network (an ``nn.Module``
mapping images to logits) in eval mode, so BatchNorm uses its running statistics, on a
list of ``(images, labels)`` batches fixed up front (``train_subset``):

* ``hessian_trace``: Hutchinson's estimate ``mean_k v_k^T H v_k`` with Rademacher probes,
  Hessian-vector products by double backward, and its standard error;
* ``top_eigenvalue``: the dominant Hessian eigenvalue by power iteration;
* ``sharpness``: the largest increase of ``L`` found in the L2 ball of radius
  ``rho`` around the weights (Keskar et al. 2017, Foret et al. 2021) by normalised gradient-ascent
  steps projected back onto the ball;
* ``interpolate``: loss and accuracy along the straight segment between two networks of
  one architecture (parameters and float buffers mixed alike);
* ``surface``: the loss on a grid around a network along two filter-normalised random
  directions (Li et al. 2018).

Networks are perturbed in place and restored bit-exactly; random draws use their own
generators, so the global random state is left as it was. Only torch is imported here;
matplotlib is imported by the plotting functions alone.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

Batches = list[tuple[Tensor, Tensor]]

SEED_SALT = 5151
"""Mixed into the run's seed for the probes and directions, so they differ from training's draws."""


# ---------------------------------------------------------------- the objective

def train_subset(data: Any, samples: int, seed: int) -> Batches:
    """The data module's fixed, unaugmented, normalised training subset, held in memory."""
    return [(x, y) for x, y in data.train_eval_batches(samples, seed)]


def _params(net: nn.Module) -> list[nn.Parameter]:
    return [p for p in net.parameters()]


@contextmanager
def _eval_with_grad(net: nn.Module) -> Iterator[list[nn.Parameter]]:
    """``net`` in eval mode with every parameter requiring a gradient; both restored after."""
    modes = {m: m.training for m in net.modules()}
    params = _params(net)
    wanted = [p.requires_grad for p in params]
    net.eval()
    for p in params:
        p.requires_grad_(True)
    try:
        yield params
    finally:
        for p, w in zip(params, wanted):
            p.requires_grad_(w)
            p.grad = None
        for m, mode in modes.items():
            m.training = mode


def _count(batches: Batches) -> int:
    return sum(len(y) for _, y in batches)


def loss_and_accuracy(net: nn.Module, batches: Batches, state: dict[str, Tensor] | None = None) -> tuple[float, float]:
    """Mean cross entropy and top-1 accuracy (%) of ``net`` (or of ``net`` run with ``state``)."""
    n, loss, correct = _count(batches), 0.0, 0
    modes = {m: m.training for m in net.modules()}
    net.eval()
    try:
        with torch.no_grad():
            for x, y in batches:
                z = net(x) if state is None else functional_call(net, state, (x,))
                loss += float(F.cross_entropy(z.float(), y, reduction="sum"))
                correct += int((z.argmax(1) == y).sum())
    finally:
        for m, mode in modes.items():
            m.training = mode
    return loss / max(n, 1), 100.0 * correct / max(n, 1)


def _loss(net: nn.Module, x: Tensor, y: Tensor, n: int) -> Tensor:
    return F.cross_entropy(net(x).float(), y, reduction="sum") / n


def gradient(net: nn.Module, batches: Batches) -> tuple[float, list[Tensor]]:
    """``L`` and its gradient w.r.t. every parameter (call inside ``_eval_with_grad``)."""
    params, n = _params(net), _count(batches)
    grads = [torch.zeros_like(p) for p in params]
    total = 0.0
    for x, y in batches:
        loss = _loss(net, x, y, n)
        for g, d in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
            if d is not None:
                g.add_(d)
        total += float(loss.detach())
    return total, grads


def hvp(net: nn.Module, batches: Batches, v: Sequence[Tensor]) -> list[Tensor]:
    """``H v``, the Hessian of ``L`` times ``v``, by double backward, one batch at a time."""
    params, n = _params(net), _count(batches)
    out = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        grads = torch.autograd.grad(_loss(net, x, y, n), params, create_graph=True, allow_unused=True)
        pairs = [(g, u) for g, u in zip(grads, v) if g is not None]
        dot = cast(Tensor, sum((g * u).sum() for g, u in pairs))  # typed `| Literal[0]` for an empty sum
        used = [p for p, g in zip(params, grads) if g is not None]
        hv = iter(torch.autograd.grad(dot, used, allow_unused=True))
        for o, g in zip(out, grads):
            if g is not None:
                h = next(hv)
                if h is not None:
                    o.add_(h)
    return out


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return cast(Tensor, sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def _norm(a: Sequence[Tensor]) -> Tensor:
    return _dot(a, a).sqrt()


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + SEED_SALT)


# ---------------------------------------------------------------- curvature

@dataclass(frozen=True)
class Trace:
    value: float
    stderr: float
    probes: int


def hessian_trace(net: nn.Module, batches: Batches, probes: int = 8, seed: int = 0) -> Trace:
    """Hutchinson's estimate of ``tr H`` from ``probes`` Rademacher vectors, with the standard
    error of the mean over probes (0 for a single probe, whose spread is unknown)."""
    g = _generator(seed)
    samples = []
    with _eval_with_grad(net) as params:
        for _ in range(probes):
            v = [(torch.randint(0, 2, p.shape, generator=g, dtype=p.dtype) * 2 - 1).to(p.device) for p in params]
            samples.append(float(_dot(v, hvp(net, batches, v))))
    t = torch.tensor(samples, dtype=torch.float64)
    se = float(t.std(unbiased=True) / math.sqrt(len(samples))) if len(samples) > 1 else 0.0
    return Trace(float(t.mean()), se, probes)


def top_eigenvalue(net: nn.Module, batches: Batches, iters: int = 20, seed: int = 0, tol: float = 1e-4) -> float:
    """The dominant eigenvalue of ``H`` (largest in magnitude; at a minimum, the largest) by power
    iteration from a Gaussian start, stopping early once the Rayleigh quotient changes by less
    than ``tol`` relative."""
    g = _generator(seed + 1)
    with _eval_with_grad(net) as params:
        v = [torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) for p in params]
        norm = _norm(v)
        v = [u / norm.to(u.dtype) for u in v]
        eig = 0.0
        for _ in range(max(1, iters)):
            hv = hvp(net, batches, v)
            new = float(_dot(v, hv))
            norm = _norm(hv)
            if float(norm) == 0.0:
                return 0.0
            v = [h / norm.to(h.dtype) for h in hv]
            done = abs(new - eig) <= tol * max(abs(new), 1e-12)
            eig = new
            if done:
                break
    return eig


# ---------------------------------------------------------------- sharpness

@contextmanager
def _restoring(net: nn.Module) -> Iterator[list[Tensor]]:
    """Yields copies of the parameters; whatever happens to them, they are copied back."""
    params = _params(net)
    saved = [p.detach().clone() for p in params]
    try:
        yield saved
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def sharpness(net: nn.Module, batches: Batches, rho: float = 0.05, steps: int = 5) -> float:
    """``max L(theta + d) - L(theta)`` over ``||d|| <= rho`` as found by ``steps`` normalised
    gradient-ascent steps (the first of the full radius, as SAM's perturbation, the rest of half
    of it), each projected back onto the ball; the starting point counts, so the result is >= 0.
    The radius is absolute, as SAM's rho: a radius relative to the whole parameter norm lets the
    perturbation pile onto a few sensitive weights and the figure explode. The parameters are
    restored bit-exactly."""
    if rho <= 0 or steps <= 0:
        return 0.0
    with _eval_with_grad(net) as params, _restoring(net) as theta:
        radius = float(rho)
        base, grads = gradient(net, batches)
        best = base
        delta = [torch.zeros_like(p) for p in params]
        for step in range(steps):
            gnorm = float(_norm(grads))
            if gnorm == 0.0 or radius == 0.0:
                break
            size = radius if step == 0 else radius / 2
            delta = [d + (size / gnorm) * gr for d, gr in zip(delta, grads)]
            dnorm = float(_norm(delta))
            if dnorm > radius:
                delta = [d * (radius / dnorm) for d in delta]
            with torch.no_grad():
                for p, t, d in zip(params, theta, delta):
                    p.copy_(t + d)
            loss, grads = gradient(net, batches)
            best = max(best, loss)
    return max(0.0, best - base)


# ---------------------------------------------------------------- interpolation and surfaces

def _state(net: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in net.state_dict().items()}


def mix_states(a: dict[str, Tensor], b: dict[str, Tensor], t: float) -> dict[str, Tensor]:
    """``(1 - t) a + t b`` for every float entry (parameters and BatchNorm statistics);
    integer buffers come from ``a``."""
    return {k: torch.lerp(v, b[k].to(v), t) if v.is_floating_point() else v for k, v in a.items()}


@dataclass(frozen=True)
class Curve:
    """Loss and accuracy at ``t`` along a path through ``nodes`` (``t`` in node units: node ``i``
    sits at ``t = i``)."""
    nodes: tuple[str, ...]
    t: tuple[float, ...]
    loss: tuple[float, ...]
    accuracy: tuple[float, ...]

    @property
    def name(self) -> str:
        return "-".join(self.nodes)

    @property
    def barrier(self) -> float:
        """The largest excess of the loss over the straight line between the path's two ends."""
        first, last, span = self.loss[0], self.loss[-1], self.t[-1] or 1.0
        return max(loss - (first + (last - first) * t / span) for t, loss in zip(self.t, self.loss))


def interpolate(nets: Sequence[nn.Module], names: Sequence[str], batches: Batches, points: int = 11) -> Curve:
    """Loss and accuracy along the piecewise-straight path ``nets[0] -> nets[1] -> ...``, with
    ``points`` evaluations per segment (ends included); ``nets`` share one architecture."""
    template = copy.deepcopy(nets[0])
    states = [_state(n) for n in nets]
    ts, losses, accs = [], [], []
    grid = torch.linspace(0.0, 1.0, max(points, 2)).tolist()
    for seg, (a, b) in enumerate(zip(states, states[1:])):
        for j, t in enumerate(grid):
            if seg > 0 and j == 0:
                continue  # the node the previous segment ended on
            state = a if t == 0.0 else b if t == 1.0 else mix_states(a, b, t)
            loss, acc = loss_and_accuracy(template, batches, state)
            ts.append(seg + t)
            losses.append(loss)
            accs.append(acc)
    return Curve(tuple(names), tuple(ts), tuple(losses), tuple(accs))


def filter_normalised_direction(net: nn.Module, g: torch.Generator) -> list[Tensor]:
    """A Gaussian direction with each filter (row of a weight, along its first dimension) scaled
    to the norm of the same filter of ``net``; zero for biases and BatchNorm parameters."""
    out = []
    for p in _params(net):
        if p.dim() <= 1:
            out.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device)
        dims = tuple(range(1, p.dim()))
        norm = torch.linalg.vector_norm
        d = d * (norm(p.detach(), dim=dims, keepdim=True) / norm(d, dim=dims, keepdim=True).clamp_min(1e-12))
        out.append(d)
    return out


@dataclass(frozen=True)
class Surface:
    alphas: tuple[float, ...]
    betas: tuple[float, ...]
    loss: tuple[tuple[float, ...], ...]
    """``loss[i][j]`` at ``theta + betas[i] d2 + alphas[j] d1``."""


def surface(net: nn.Module, batches: Batches, grid: int = 9, span: float = 1.0, seed: int = 0) -> Surface:
    """The loss on a ``grid`` x ``grid`` lattice over ``[-span, span]^2`` along two filter-normalised
    random directions; the parameters are restored bit-exactly."""
    g = _generator(seed + 2)
    d1, d2 = filter_normalised_direction(net, g), filter_normalised_direction(net, g)
    coords = torch.linspace(-span, span, max(grid, 2)).tolist()
    rows = []
    with _restoring(net) as theta:
        params = _params(net)
        for b in coords:
            row = []
            for a in coords:
                with torch.no_grad():
                    for p, t, u, w in zip(params, theta, d1, d2):
                        p.copy_(t + a * u + b * w)
                row.append(loss_and_accuracy(net, batches)[0])
            rows.append(tuple(row))
    return Surface(tuple(coords), tuple(coords), tuple(rows))


# ---------------------------------------------------------------- all scalar measures

def scalar_measures(net: nn.Module, batches: Batches, probes: int = 8, rho: float = 0.05,
                    iters: int = 20, seed: int = 0) -> dict[str, float]:
    """Loss, accuracy, Hessian trace (and its standard error), top eigenvalue and sharpness."""
    loss, acc = loss_and_accuracy(net, batches)
    trace = hessian_trace(net, batches, probes, seed)
    return {"loss": loss, "accuracy": acc, "hessian_trace": trace.value, "hessian_trace_se": trace.stderr,
            "top_eig": top_eigenvalue(net, batches, iters, seed), "sharpness": sharpness(net, batches, rho)}


def metric_names(measures: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{network: {measure: value}}`` as flat metrics ``flat/<measure>/<network>``."""
    return {f"flat/{m}/{net}": v for net, values in measures.items() for m, v in values.items()}


@contextmanager
def _rng_kept(device: torch.device) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def measure_networks(nets: dict[str, nn.Module], batches: Batches, probes: int, rho: float,
                     seed: int, iters: int = 20) -> dict[str, dict[str, float]]:
    """``scalar_measures`` of private float32 copies of ``nets``: the originals (their weights,
    modes and gradients) and the global random state are left exactly as they were."""
    out = {}
    device = batches[0][0].device if batches else torch.device("cpu")
    with _rng_kept(device):
        for name, net in nets.items():
            mine = copy.deepcopy(net).float()
            out[name] = scalar_measures(mine, batches, probes, rho, iters, seed)
    return out


def final_metrics(spec: Any, method: nn.Module, data: Any, device: torch.device) -> dict[str, float]:
    """The ``flat/*`` metrics of every analysis network of a trained method, as the engine adds
    them to the last epoch when the recipe says ``flatness=final`` (nothing otherwise). Runs
    on every rank without collective calls."""
    recipe, _ = spec.resolved()
    if recipe.flatness != "final":
        return {}
    nets = method.analysis_networks()
    if not nets:
        return {}
    with _rng_kept(device):
        batches = train_subset(data, recipe.flatness_samples, spec.seed)
    return metric_names(measure_networks(nets, batches, recipe.flatness_probes, recipe.flatness_rho, spec.seed))


# ---------------------------------------------------------------- plots

def _figure() -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend
    return Figure(figsize=(6.4, 4.4), dpi=110)


def plot_interpolation(curves: Iterable[Curve], path: Path) -> Path:
    """Loss (left axis) and accuracy (right axis) along each path, nodes marked."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    acc_ax = ax.twinx()
    for curve in curves:
        span = curve.t[-1] or 1.0
        x = [t / span for t in curve.t]
        line, = ax.plot(x, curve.loss, marker=".", label=f"{' -> '.join(curve.nodes)} (loss)")
        acc_ax.plot(x, curve.accuracy, linestyle="--", color=line.get_color(), alpha=0.6)
        for i, node in enumerate(curve.nodes):
            k = curve.t.index(float(i))
            ax.annotate(node, (x[k], curve.loss[k]), textcoords="offset points", xytext=(0, 6), fontsize=7,
                        ha="center")
    ax.set_xlabel("position along the path")
    ax.set_ylabel("training-subset cross entropy (solid)")
    acc_ax.set_ylabel("training-subset accuracy % (dashed)")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("Linear interpolation between networks")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_surface(surf: Surface, network: str, path: Path) -> Path:
    """Contours of the loss surface around ``network``, the network itself marked."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    cs = ax.contourf(surf.alphas, surf.betas, surf.loss, levels=20, cmap="viridis")
    ax.contour(surf.alphas, surf.betas, surf.loss, levels=10, colors="white", linewidths=0.5)
    fig.colorbar(cs, ax=ax, label="training-subset cross entropy")
    ax.plot([0.0], [0.0], marker="*", color="red", markersize=10)
    ax.set_xlabel("direction 1 (filter-normalised)")
    ax.set_ylabel("direction 2 (filter-normalised)")
    ax.set_title(f"Loss surface around {network}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
