"""How much the search saves on the embedded default (OKDPH on digits, search_spaces/okdph.yaml):
TPE + ASHA, random + ASHA, TPE without early stopping and the grid of the space's listed values,
each at the same total epoch budget, over several search seeds.

    python bench/search_efficiency.py [--knobs omega,beta,gamma,temperature] [--search-seeds 3]
                                      [--budget-fraction 0.3333] [--workers 2] [--cache PATH]
                                      [--ceiling-sample 24] [--ceiling-seed 1] [--ceiling-only]
                                      [--epochs N] [--set KEY=VALUE ...]

What is trained and what is replayed: every configuration of the grid is trained once (training
seed 0, the space's epochs) through the engine, as a trial trains it, and its per-epoch validation
curve is kept in ``--cache``. The strategies then run as real Ray Tune experiments with the
platform's own searcher and scheduler (``kd_platform.sweep.tuner.optuna_search``, ``tpe_sampler`` and
``asha_scheduler``); each trial reports the recorded curve of its configuration epoch by epoch, so
every TPE, random and ASHA decision is made by the real Optuna and Tune components, and only the
training itself is looked up. A trial stopped by ASHA after k epochs reports exactly what a real
trial reports (the first k epochs of the same deterministic run). Continuous knobs (omega, beta) are
sampled from their ranges as in a sweep and evaluated at the nearest listed value.

Accounting: each reported epoch costs one epoch of budget; after each one, the strategy's best is
the best trial's latest value (what the sweep reports as best, Tune's scope "last"). The grid runs
its configurations in declared order, every one to the last epoch.

The ceiling: a strategy's pick is only as good as the workload's ranking of configurations, and
one training seed's ranking may be mostly luck (another seed draws other initial weights, batches and
validation split). So a fixed random sample of the grid (``--ceiling-sample``) is trained again with
a second training seed (``--ceiling-seed``), and the rank correlation of the two seeds' final
accuracies (Spearman, with a Fisher-z 95% interval) is the best any search or early-stopping rule
can rank configurations here. Each strategy is then judged by its pick's confirmed accuracy, the
mean final accuracy over both training seeds (the second trained for any pick not yet trained),
against the best confirmed configuration among those trained with both seeds, and by its held-out
accuracy (the second seed alone: the first chose the pick, so its value carries the luck that made
it look best). Where the interval's upper end is below ``CEILING`` (one seed's ranking then shares
under a quarter of its rank variance with the other's, even at the most favourable end), it says
that the workload cannot rank strategies instead of drawing a conclusion from the table; where
the interval straddles it, it says that the ceiling is unsure. ``--ceiling-only`` trains just the
sample under both seeds and prints the ceiling: a cheap look at a workload (``--epochs``,
``--set val_fraction=0.3``) before its grid is paid for.

The knobs the grid crosses default to four of the space's seven (4 x 4 x 3 x 5 = 240
configurations, 960 epochs): the whole product of all seven is 2,880 configurations, about ten
hours of training on a 2-core CPU. The swept knobs left out are pinned to their declared defaults,
as an ablation pins them. ``--knobs`` picks others.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Sequence

DEFAULT_KNOBS = "omega,beta,gamma,temperature"
WITHIN = 0.5  # points of validation accuracy
CEILING = 0.5  # the least upper end of the seed-to-seed Spearman interval that lets strategies be ranked
SAMPLE_SEED = 0  # fixes which configurations the ceiling samples, so reruns reuse their cached curves
Report = tuple[str, float]  # (trial, the metric it reported for one more epoch)


# --- accounting -------------------------------------------------------------------------------

def best_trace(reports: Sequence[Report]) -> list[float]:
    """After each reported epoch (so after 1, 2, ... epochs of budget), the best trial's latest value."""
    latest: dict[str, float] = {}
    trace = []
    for trial, value in reports:
        latest[trial] = value
        trace.append(max(latest.values()))
    return trace


def epochs_to_reach(trace: Sequence[float], target: float) -> int | None:
    """The budget (epochs) after which the best first reaches ``target``; None if it never does."""
    for spent, best in enumerate(trace, 1):
        if best >= target - 1e-9:
            return spent
    return None


def picked(reports: Sequence[Report]) -> str:
    """The trial the strategy calls best at the end: the one whose latest value is highest (ties
    go to the trial that reported first)."""
    latest: dict[str, float] = {}
    for trial, value in reports:
        latest[trial] = value
    return max(latest, key=latest.__getitem__)


def grid_reports(grid: Sequence[dict[str, Any]], curves: dict[str, list[float]]) -> list[Report]:
    """The grid in declared order, every configuration trained to the last epoch."""
    return [(config_key(c), v) for c in grid for v in curves[config_key(c)]]


# --- the grid and its curves ------------------------------------------------------------------

def config_key(config: dict[str, Any]) -> str:
    return json.dumps({k: config[k] for k in sorted(config)}, sort_keys=True)


def snap(config: dict[str, Any], values: dict[str, list[Any]]) -> dict[str, Any]:
    """A sampled configuration at the grid's listed values (a number: the nearest one)."""
    out = {}
    for knob, listed in values.items():
        v = config[knob]
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = min(listed, key=lambda x: abs(float(x) - float(v)))
        out[knob] = v
    return out


@dataclasses.dataclass
class Bench:
    """The benchmark's space (only the grid's knobs swept), its grid and what a trial fixes."""
    space: Any
    values: dict[str, list[Any]]
    fixed: dict[str, Any]
    epochs: int
    pinned: dict[str, Any] = dataclasses.field(default_factory=dict)  # swept knobs the grid leaves out
    seed: int = 0

    @property
    def grid(self) -> list[dict[str, Any]]:
        keys = list(self.values)
        return [dict(zip(keys, combo)) for combo in itertools.product(*self.values.values())]

    def fingerprint(self) -> str:
        import torch
        text = json.dumps([self.space.method, self.fixed, self.epochs, self.seed, self.space.metric,
                           torch.__version__], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_bench(knobs: Sequence[str], space: Any = None, epochs: int | None = None) -> Bench:
    """The grid over ``knobs``' listed values, the other swept knobs pinned as an ablation pins them."""
    from kd_platform.sweep.ablate import plan_ablation
    from kd_platform.sweep.space import load_space
    space = space or load_space("okdph")
    plan = plan_ablation(space, ",".join(knobs), 1, 0)
    epochs = epochs or space.epochs
    fixed = {**space.fixed, **plan.pinned, "epochs": epochs}
    searched = dataclasses.replace(space, swept={k: space.swept[k] for k in knobs}, fixed=fixed)
    return Bench(searched, dict(plan.grid), fixed, epochs, dict(plan.pinned))


def train_curve(method: str, flat: dict[str, Any], seed: int, metric: str) -> list[float]:
    """One configuration trained through the engine, as a trial trains it: its metric per epoch."""
    import torch

    from kd_platform.run.engine import RunSpec, train
    torch.set_num_threads(1)
    curve: list[float] = []
    train(RunSpec.from_flat(method, flat, seed), lambda m, save: curve.append(float(m[metric])))
    return curve


def read_cache(cache: Path) -> dict[str, dict[str, Any]]:
    """The cache's curves per bench fingerprint (one per training seed and setup), so that another
    seed or grid adds to the file instead of replacing what it holds."""
    stored: dict[str, Any] = json.loads(cache.read_text()) if cache.is_file() else {}
    if "curves" in stored:  # the single-seed layout of earlier versions: keep its curves
        return {stored["fingerprint"]: {"curves": stored["curves"]}}
    return stored.get("benches", {})


def load_curves(bench: Bench, cache: Path, workers: int, say: Callable[[str], None] = print,
                configs: Sequence[dict[str, Any]] | None = None) -> dict[str, list[float]]:
    """The curves of ``configs`` (default the whole grid) under ``bench.seed``, with any others the
    cache holds for it: from ``cache`` where it holds them, else trained now (``workers`` at once)
    and added to it as each one finishes."""
    benches = read_cache(cache)
    fingerprint = bench.fingerprint()
    curves = benches.get(fingerprint, {}).get("curves", {})
    configs = bench.grid if configs is None else configs
    todo = [c for c in configs if config_key(c) not in curves]
    if not todo:
        return curves
    say(f"training {len(todo)} of {len(configs)} configurations (training seed {bench.seed}, {bench.epochs} epochs "
        f"each, {workers} at once)")
    t0 = time.perf_counter()
    cache.parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        jobs = {pool.submit(train_curve, bench.space.method, {**bench.fixed, **c}, bench.seed, bench.space.metric):
                config_key(c) for c in todo}
        for done, job in enumerate(as_completed(jobs), 1):
            curves[jobs[job]] = job.result()
            benches[fingerprint] = {"seed": bench.seed, "curves": curves}
            cache.write_text(json.dumps({"benches": benches}))
            if done % 20 == 0 or done == len(todo):
                say(f"  {done}/{len(todo)} trained ({time.perf_counter() - t0:.0f} s)")
    return curves


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Rank correlation (ties take their mean rank): how well one ordering predicts the other."""
    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    a, b = ranks(xs), ranks(ys)
    ma, mb = statistics.mean(a), statistics.mean(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    var = math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))
    return cov / var if var else float("nan")


@dataclasses.dataclass
class Ceiling:
    """How well one training seed's final accuracies rank configurations for another's."""
    n: int
    rho: float          # Spearman
    low: float          # its 95% interval
    high: float
    mean_change: float  # mean absolute seed-to-seed change, points

    @property
    def verdict(self) -> str:
        """"low": the workload cannot rank strategies; "high": it can; "unsure": the interval straddles
        ``CEILING``, so more configurations are needed to tell."""
        if not self.high >= CEILING:  # NaN too: constant accuracies rank nothing
            return "low"
        return "high" if self.low >= CEILING else "unsure"


def ceiling(first: Sequence[float], second: Sequence[float]) -> Ceiling:
    """The seed-to-seed agreement of the same configurations' final accuracies. The interval is
    Fisher's z with the variance 1.06 / (n - 3) of Fieller, Hartley and Pearson (1957) for Spearman's
    coefficient, which the plain 1 / (n - 3) of Pearson's understates."""
    from scipy.stats import spearmanr
    n = len(first)
    rho = float(spearmanr(first, second).statistic)
    if n > 3 and not math.isnan(rho):
        z, half = math.atanh(max(-1 + 1e-12, min(1 - 1e-12, rho))), 1.959964 * math.sqrt(1.06 / (n - 3))
        low, high = math.tanh(z - half), math.tanh(z + half)
    else:
        low, high = (-1.0, 1.0) if n <= 3 else (math.nan, math.nan)
    change = statistics.mean(abs(a - b) for a, b in zip(first, second)) if n else math.nan
    return Ceiling(n, rho, low, high, change)


def conclusion(ceil: Ceiling) -> str | None:
    """The sentence that replaces or qualifies the table's verdict on strategies (None: it stands)."""
    if ceil.verdict == "low":
        return (f"The workload cannot rank strategies: even the upper end of the ceiling's interval ({ceil.high:.2f}) "
                f"is below {CEILING}, so which configuration a search calls best is decided mostly by the training "
                f"seed, and no strategy can be judged better or worse than another on it.")
    if ceil.verdict == "unsure":
        return (f"The ceiling's interval straddles {CEILING}, so it is unsure whether this workload can rank "
                f"strategies at all, and the goal's verdict above is unconfirmed; a larger --ceiling-sample would "
                f"tell.")
    return None


def ceiling_sample(grid: Sequence[dict[str, Any]], n: int, seed: int = SAMPLE_SEED) -> list[dict[str, Any]]:
    """``n`` configurations of the grid drawn at random (all of it if smaller), in the grid's order."""
    picked = sorted(random.Random(seed).sample(range(len(grid)), min(n, len(grid))))
    return [grid[i] for i in picked]


def confirmed(key: str, finals: dict[int, dict[str, float]]) -> float:
    """A configuration's final accuracy averaged over the training seeds of ``finals``."""
    return statistics.mean(f[key] for f in finals.values())


def reference(finals: dict[int, dict[str, float]]) -> tuple[str, float]:
    """The best configuration by confirmed accuracy among those every training seed has trained."""
    both = set.intersection(*(set(f) for f in finals.values()))
    best = max(sorted(both), key=lambda k: confirmed(k, finals))
    return best, confirmed(best, finals)


def early_rank_agreement(curves: dict[str, list[float]]) -> list[float]:
    """Per epoch before the last, the rank correlation of the grid's values then with its final
    values: what ASHA relies on when it stops trials at a rung."""
    keys = list(curves)
    epochs = min(len(c) for c in curves.values())
    final = [curves[k][-1] for k in keys]
    return [spearman([curves[k][e] for k in keys], final) for e in range(epochs - 1)]


# --- the strategies, through real Ray Tune, Optuna and ASHA --------------------------------------

def replay_trial(config: dict[str, Any], *, curves: dict[str, list[float]], values: dict[str, list[Any]],
                 metric: str) -> None:
    """A Tune trainable that reports its configuration's recorded curve, one epoch per report."""
    from ray import tune
    for epoch, value in enumerate(curves[config_key(snap(config, values))], 1):
        tune.report({metric: value, "epoch": epoch})


def _callbacks(budget: int) -> tuple[Any, Any]:
    """A callback that logs every result the driver processes, in order, and a stopper that ends
    the experiment once ``budget`` epochs have been reported."""
    from ray import tune
    from ray.tune.stopper import Stopper

    class Log(tune.Callback):
        def __init__(self) -> None:
            self.reports: list[Report] = []
            self.configs: dict[str, dict[str, Any]] = {}

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            self.reports.append((trial.trial_id, float(result[METRIC[0]])))
            self.configs[trial.trial_id] = dict(trial.config)

    class Budget(Stopper):
        def __init__(self, log: Log) -> None:
            self.log = log

        def __call__(self, trial_id: str, result: dict) -> bool:
            return False

        def stop_all(self) -> bool:
            return len(self.log.reports) >= budget

    log = Log()
    return log, Budget(log)


METRIC: list[str] = [""]  # the metric the log reads (set per run; callbacks are built in the driver)

STRATEGIES = {  # name: (sampler, early stopping)
    "TPE + ASHA": ("tpe", True),
    "random + ASHA": ("random", True),
    "TPE, no early stopping": ("tpe", False),
}


def parse_strategies(text: str) -> list[str]:
    """Comma-separated strategy names. A name may hold a comma itself ("TPE, no early stopping"),
    so the longest run of pieces that names a strategy wins; ValueError names the first unknown piece."""
    pieces = [x.strip() for x in text.split(",")]
    out, i = [], 0
    while i < len(pieces):
        if not pieces[i]:
            i += 1
            continue
        j = next((j for j in range(len(pieces), i, -1) if ", ".join(pieces[i:j]) in STRATEGIES), None)
        if j is None:
            raise ValueError(pieces[i])
        out.append(", ".join(pieces[i:j]))
        i = j
    return out


def quiet_tune() -> None:
    """Replayed trials are instant: Tune's per-result files and snapshot warnings would dominate."""
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


@dataclasses.dataclass
class Run:
    reports: list[Report]                # in the order the driver saw them (past the budget too)
    configs: dict[str, dict[str, Any]]   # per trial, the configuration the searcher suggested
    tune_epochs: dict[str, int]          # per trial, the epochs Tune's own results count

    def within(self, budget: int) -> list[Report]:
        return self.reports[:budget]


def run_strategy(bench: Bench, curves: dict[str, list[float]], name: str, budget: int, search_seed: int,
                 storage: str) -> Run:
    """One strategy through a real Tune experiment."""
    import optuna
    from ray import tune

    from kd_platform.sweep.tuner import asha_scheduler, optuna_search, tpe_sampler
    if __name__ != "__main__":  # imported from bench/ (a test): Ray's workers cannot import it by name
        from ray import cloudpickle
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    sampler_kind, early = STRATEGIES[name]
    samples = budget  # every trial reports at least one epoch: never more trials than epochs
    sampler = tpe_sampler(search_seed, samples) if sampler_kind == "tpe" else \
        optuna.samplers.RandomSampler(seed=search_seed)
    METRIC[0] = bench.space.metric
    log, stopper = _callbacks(budget)
    label = f"{sampler_kind}-{'asha' if early else 'fifo'}-{search_seed}"
    trainable = tune.with_resources(tune.with_parameters(replay_trial, curves=curves, values=bench.values,
                                                         metric=bench.space.metric), {"CPU": 1})
    tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(
        search_alg=optuna_search(bench.space, sampler, label),
        scheduler=asha_scheduler(bench.space, bench.epochs) if early else None,
        num_samples=samples, max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(name=label, storage_path=storage, callbacks=[log], stop=stopper, verbose=0))
    results = tuner.fit()
    return Run(log.reports, log.configs, {r.metrics["trial_id"]: int(r.metrics["training_iteration"])
                                          for r in results if r.metrics})


# --- the table --------------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    strategy: str
    budget: int
    best: list[float]             # per search seed
    reach: list[int | None]       # per search seed: epochs to come within WITHIN of the grid's best
    trials: list[int]
    picks: list[str] = dataclasses.field(default_factory=list)        # per search seed: its best's configuration
    confirmed: list[float] = dataclasses.field(default_factory=list)  # per search seed: the pick over both seeds
    held_out: list[float] = dataclasses.field(default_factory=list)   # per search seed: the pick under the second

    def cells(self) -> list[str]:
        reach = ", ".join("-" if r is None else str(r) for r in self.reach)
        return [self.strategy, str(self.budget), f"{statistics.mean(self.trials):.0f}", spread(self.best),
                spread(self.confirmed) if self.confirmed else "", spread(self.held_out) if self.held_out else "", reach]


def spread(values: Sequence[float]) -> str:
    """The mean over search seeds, with the range where they differ."""
    mean = f"{statistics.mean(values):.2f}"
    return mean + (f" [{min(values):.2f}-{max(values):.2f}]" if len(set(values)) > 1 else "")


def summarise(name: str, runs: Sequence[Sequence[Report]], budget: int, target: float,
              configs: Sequence[dict[str, str]] | None = None) -> Row:
    """``configs``: per run, each trial's configuration key (default: the trials are named by theirs)."""
    traces = [best_trace(r) for r in runs]
    picks = [picked(r) for r in runs]
    if configs is not None:
        picks = [c[p] for c, p in zip(configs, picks)]
    return Row(name, budget, [t[-1] for t in traces], [epochs_to_reach(t, target) for t in traces],
               [len({trial for trial, _ in r}) for r in runs], picks)


def table(rows: Sequence[Row], seeds: Sequence[int] = (0, 1)) -> str:
    head = ["strategy", "budget (epochs)", "trials", f"best val acc (training seed {seeds[0]})",
            f"confirmed acc (seeds {' + '.join(map(str, seeds))})", f"held-out acc (seed {seeds[1]})",
            "epochs to within 0.5 of grid best, per seed"]
    body = [r.cells() for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(x, widths)) + " |" for x in [head, *body]]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def evaluate(bench: Bench, curves: dict[str, list[float]], seeds: Sequence[int], budget_fraction: float,
             storage: str, strategies: Sequence[str] = tuple(STRATEGIES)) -> tuple[list[Row], dict[str, Any]]:
    """Every strategy over ``seeds`` at an equal budget (``budget_fraction`` of the grid's epochs),
    the grid in declared order at that budget, and the complete grid."""
    grid = grid_reports(bench.grid, curves)
    finals = {config_key(c): curves[config_key(c)][-1] for c in bench.grid}
    grid_best = max(finals.values())
    target = grid_best - WITHIN
    budget = max(1, math.floor(len(grid) * budget_fraction + 1e-9))
    rows = []
    for name in strategies:
        runs = [run_strategy(bench, curves, name, budget, seed, storage) for seed in seeds]
        keys = [{t: config_key(snap(c, bench.values)) for t, c in r.configs.items()} for r in runs]
        rows.append(summarise(name, [r.within(budget) for r in runs], budget, target, keys))
    rows.append(summarise("grid, declared order", [grid[:budget]], budget, target))
    rows.append(summarise("grid, complete", [grid], len(grid), target))
    facts = {"grid_configs": len(bench.grid), "grid_epochs": len(grid), "grid_best": grid_best,
             "best_config": json.loads(max(finals, key=finals.get)), "budget": budget,
             "near_best": sum(v >= target - 1e-9 for v in finals.values())}
    return rows, facts


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--knobs", default=DEFAULT_KNOBS, help=f"swept knobs the grid crosses (default {DEFAULT_KNOBS})")
    p.add_argument("--search-seeds", type=int, default=3, help="search seeds per strategy (default 3)")
    p.add_argument("--budget-fraction", type=float, default=1 / 3,
                   help="every strategy's budget, as a fraction of the grid's epochs (default 1/3)")
    p.add_argument("--grace-period", type=int, help="ASHA's grace period (default: the space file's)")
    p.add_argument("--reduction-factor", type=int, help="ASHA's reduction factor (default: the space file's)")
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help=f"which to run, comma-separated (default all: {', '.join(STRATEGIES)})")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="trainings at once for the curves")
    p.add_argument("--cache", type=Path, default=Path("kd_results/search_efficiency_curves.json"),
                   help="where the trained curves are kept (default kd_results/search_efficiency_curves.json)")
    p.add_argument("--ceiling-sample", type=int, default=24,
                   help="configurations of the grid, drawn at random, trained with the second seed (default 24)")
    p.add_argument("--ceiling-seed", type=int, default=1, help="the second training seed (default 1)")
    p.add_argument("--ceiling-only", action="store_true",
                   help="train only the ceiling's sample, under both seeds, and print the ceiling")
    p.add_argument("--epochs", type=int, help="epochs per trial (default: the space file's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a knob the grid does not cross, e.g. val_fraction=0.3 (repeatable)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    knobs = [k.strip() for k in args.knobs.split(",") if k.strip()]
    sets = {k.strip(): v.strip() for k, v in (pair.partition("=")[::2] for pair in args.set)}
    if any(not k or not v or k in knobs for k, v in sets.items()):
        p.error(f"--set: expects KEY=VALUE for a knob the grid does not cross, got {args.set}")
    if args.ceiling_sample < 4:
        p.error("--ceiling-sample: at least 4 configurations (the interval needs n > 3)")
    bench = make_bench(knobs, epochs=args.epochs)
    bench.fixed.update(sets)
    bench.space = dataclasses.replace(bench.space, grace_period=args.grace_period or bench.space.grace_period,
                                      reduction_factor=args.reduction_factor or bench.space.reduction_factor,
                                      fixed=bench.fixed)
    if args.ceiling_seed == bench.seed:
        p.error(f"--ceiling-seed: must differ from the grid's training seed ({bench.seed})")
    try:
        strategies = parse_strategies(args.strategies)
    except ValueError as exc:
        p.error(f"--strategies: unknown '{exc}'; known: {', '.join(STRATEGIES)}")
    second = dataclasses.replace(bench, seed=args.ceiling_seed)
    sample = ceiling_sample(bench.grid, args.ceiling_sample)
    curves = load_curves(bench, args.cache, args.workers, configs=sample if args.ceiling_only else None)
    curves_2 = load_curves(second, args.cache, args.workers, configs=sample)
    train_s = time.perf_counter() - t0
    keys = [config_key(c) for c in sample]
    ceil = ceiling([curves[k][-1] for k in keys], [curves_2[k][-1] for k in keys])
    import torch

    from kd_platform.config.recipe import Recipe
    sizes = " x ".join(f"{k} {len(v)}" for k, v in bench.values.items())
    dataset = bench.fixed.get("dataset", Recipe().dataset)
    header = (f"\nSearch efficiency: {bench.space.method} on {dataset}, {bench.epochs} epochs per "
              f"trial, metric {bench.space.metric} ({os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"python {sys.version.split()[0]})")
    ceiling_line = (f"ceiling: {ceil.n} of the grid's configurations (a fixed random sample) trained with training "
                    f"seeds {bench.seed} and {second.seed}: Spearman of their final accuracies {ceil.rho:.2f} "
                    f"(95% interval {ceil.low:.2f} to {ceil.high:.2f}, Fisher z), mean absolute seed-to-seed change "
                    f"{ceil.mean_change:.2f} points")
    verdict = conclusion(ceil)
    if args.ceiling_only:
        print(header)
        print(f"grid: {sizes}; pinned or set: {', '.join(f'{k}={v}' for k, v in bench.fixed.items())}")
        print(ceiling_line)
        if verdict:
            print(verdict)
        print(f"done in {time.perf_counter() - t0:.0f} s (curves {train_s:.0f} s)")
        return
    import ray
    quiet_tune()
    ray.init(num_cpus=1, include_dashboard=False, logging_level=logging.WARNING)
    with tempfile.TemporaryDirectory() as storage:
        rows, facts = evaluate(bench, curves, range(args.search_seeds), args.budget_fraction, storage, strategies)
    ray.shutdown()
    t1 = time.perf_counter()
    picks = [dict(json.loads(k)) for k in dict.fromkeys(k for r in rows for k in r.picks)]
    curves_2 = load_curves(second, args.cache, args.workers, configs=picks)
    train_s += time.perf_counter() - t1
    judged = set(keys) | {config_key(c) for c in picks}  # other cached curves of the second seed stay out
    finals = {bench.seed: {k: c[-1] for k, c in curves.items()},
              second.seed: {k: c[-1] for k, c in curves_2.items() if k in judged}}
    for row in rows:
        row.confirmed = [confirmed(k, finals) for k in row.picks]
        row.held_out = [finals[second.seed][k] for k in row.picks]
    ref_key, ref = reference(finals)
    both = set(finals[bench.seed]) & set(finals[second.seed])
    print(header)
    print(f"grid: {sizes} = {facts['grid_configs']} configurations, {facts['grid_epochs']} epochs; "
          f"best {facts['grid_best']:.2f} at {facts['best_config']} (training seed {bench.seed}); {facts['near_best']} "
          f"configurations lie within {WITHIN} points of it")
    if bench.pinned or sets:
        print(f"pinned (declared defaults) or set: "
              f"{', '.join(f'{k}={bench.fixed[k]}' for k in [*bench.pinned, *sets])}")
    print(f"each strategy: {facts['budget']} epochs (a {args.budget_fraction:.3g} of the grid's), search seeds "
          f"{', '.join(map(str, range(args.search_seeds)))}; curves trained once (training seed {bench.seed}) and "
          f"replayed to real Ray Tune + Optuna + ASHA (grace period {bench.space.grace_period}, reduction factor "
          f"{bench.space.reduction_factor}); each pick confirmed by its final accuracy averaged over training seeds "
          f"{bench.seed} and {second.seed}, and held out by seed {second.seed}'s alone (seed {bench.seed}'s chose it)")
    print(table(rows, (bench.seed, second.seed)))
    print(f"reference: the best confirmed accuracy among the {len(both)} configurations trained with both seeds (the "
          f"ceiling's sample and the picks) is {ref:.2f}, at {json.loads(ref_key)}; a configuration of the sample "
          f"drawn at random confirms {statistics.mean(confirmed(k, finals) for k in keys):.2f} and holds out "
          f"{statistics.mean(finals[second.seed][k] for k in keys):.2f} on average")
    agreement = ", ".join(f"epoch {e + 1}: {r:.2f}" for e, r in enumerate(early_rank_agreement(curves)))
    print(f"rank correlation of the grid's values at each earlier epoch with its final values: {agreement}")
    print(ceiling_line)
    tpe = next((r for r in rows if r.strategy == "TPE + ASHA"), None)
    if ceil.verdict != "low" and tpe and facts["budget"] <= facts["grid_epochs"] // 3:
        hits = sum(r is not None for r in tpe.reach)
        print(f"goal (TPE + ASHA within {WITHIN} points of the grid's best on at most a third of the grid's epochs, "
              f"{facts['grid_epochs'] // 3}): {'met' if hits == len(tpe.reach) else 'not met'}: reached in {hits} "
              f"of {len(tpe.reach)} seeds")
    if verdict:
        print(verdict)
    print(f"done in {time.perf_counter() - t0:.0f} s (curves {train_s:.0f} s)")


if __name__ == "__main__":
    main()
