"""What one run is: method, knobs, seed and the files it uses, validated before anything starts.

A :class:`RunSpec` is plain data (it crosses process boundaries: Tune trials, Ray Train
workers, a resumed sweep's state file); the engine builds and trains from it.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Mapping

from kd_platform.config.knobs import build_config, knob_specs
from kd_platform.config.recipe import Recipe
from kd_platform.errors import UsageError
from kd_platform.methods import get_method

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Assets:
    """Files a run uses but that are not knobs (absolute paths or URIs; "" when unused)."""
    teacher_cache: str = ""
    """The directory of trained teachers (offline methods), this node's first tier."""
    teacher_checkpoint: str = ""
    """A user's own teacher (a state_dict file) instead of a trained one."""
    teacher_store: str = ""
    """Storage every node of a cluster reaches, behind the cache (``teacher_store``)."""

    @staticmethod
    def from_json(d: Mapping[str, Any] | None) -> "Assets":
        known = {f.name for f in fields(Assets)}
        return Assets(**{k: str(v) for k, v in (d or {}).items() if k in known})


@dataclass(frozen=True)
class RunSpec:
    """The whole description of one run: method, method knobs, recipe knobs and seed."""
    method: str
    knobs: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    assets: Assets = field(default_factory=Assets)

    @staticmethod
    def split(method: str, flat: Mapping[str, Any], seed: int = 0, assets: Assets | None = None) -> "RunSpec":
        """One flat mapping of knobs as method knobs and recipe knobs, unchecked (unknown keys dropped)."""
        method_keys = set(knob_specs(get_method(method).Config))
        return RunSpec(method, {k: v for k, v in flat.items() if k in method_keys},
                       {k: v for k, v in flat.items() if k in knob_specs(Recipe) and k not in method_keys}, seed,
                       assets or Assets())

    @staticmethod
    def from_flat(method: str, flat: Mapping[str, Any], seed: int, assets: Assets | None = None) -> "RunSpec":
        """Split one flat mapping of knobs into method knobs and recipe knobs, validating both."""
        spec = RunSpec.split(method, flat, seed, assets)
        unknown = set(flat) - set(spec.knobs) - set(spec.recipe)
        if unknown:
            raise UsageError(f"unknown knob '{sorted(unknown)[0]}' for method '{method}'")
        from kd_platform.data import check_recipe
        recipe, cfg = spec.resolved()
        _check_names(recipe, cfg)
        check_recipe(data_recipe(spec))
        _check_fused(spec)
        why = get_method(method).degenerate(cfg, recipe)
        if why:
            raise UsageError(f"degenerate {method} configuration: {why}")
        return spec

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "RunSpec":
        """The inverse of ``dataclasses.asdict`` (how a spec travels to Ray Train's workers)."""
        return RunSpec(d["method"], dict(d["knobs"]), dict(d["recipe"]), int(d["seed"]), Assets.from_json(d["assets"]))

    def resolved(self) -> tuple[Recipe, Any]:
        return build_config(Recipe, self.recipe), build_config(get_method(self.method).Config, self.knobs)

    def all_knobs(self) -> dict[str, Any]:
        """Every knob with its resolved value (defaults filled in), as logged to MLflow."""
        recipe, cfg = self.resolved()
        return {**asdict(recipe), **asdict(cfg), "seed": self.seed}


def _check_names(recipe: Recipe, cfg: Any) -> None:
    """Architectures and datasets are free-form strings in the knobs; check them against
    the registries here so a typo fails before anything starts."""
    from kd_platform.data import dataset_names
    from kd_platform.models import model_names
    if recipe.dataset not in dataset_names():
        raise UsageError(f"knob 'dataset': unknown dataset '{recipe.dataset}'; known: {', '.join(dataset_names())}")
    archs = {"arch": recipe.arch, **{k: v for k, v in asdict(cfg).items() if k.endswith("_arch")}}
    for key, name in archs.items():
        if name not in model_names():
            raise UsageError(f"knob '{key}': unknown architecture '{name}'; known: {', '.join(model_names())}")


FUSED_AUTO: dict[str, bool] = {"cpu": False, "cuda": False}
"""What ``fused=auto`` means per device type. On the CPU a stacked step is no faster (grouped
convolutions there are not better kernels; see bench/gpu.py's CPU figures). On CUDA it stays
off until bench/gpu.py has measured the fused step faster on a GPU and the figures are in
bench/RESULTS.md."""


@functools.lru_cache(maxsize=None)
def _stackable_arch(arch: str) -> bool:
    """Whether ``arch`` stacks; asked at every parse of a run, so each architecture is built once."""
    from kd_platform.models import build_model
    from kd_platform.models.stacked import is_stackable
    return is_stackable(build_model(arch, 2, 3))


def _check_fused(spec: RunSpec) -> None:
    recipe, _ = spec.resolved()
    if recipe.fused != "true":
        return
    from kd_platform.methods import method_names
    if not get_method(spec.method).fusable_peers:
        fusable = [m for m in method_names() if get_method(m).fusable_peers]
        raise UsageError(f"knob 'fused': method '{spec.method}' has no homogeneous peers to fuse into one model "
                         f"(methods that have: {', '.join(fusable)})")
    if not _stackable_arch(recipe.arch):
        from kd_platform.models import model_names
        stackable = [a for a in model_names() if _stackable_arch(a)]
        raise UsageError(f"knob 'fused': architecture '{recipe.arch}' cannot be stacked (its layers mix "
                         f"channels outside convolutions); stackable: {', '.join(stackable)}")


def resolve_fused(spec: RunSpec, device: "torch.device") -> bool:
    """Whether this run trains its peers fused: ``fused`` resolved for the method, the
    architecture and the device."""
    recipe, _ = spec.resolved()
    if recipe.fused == "false" or not get_method(spec.method).fusable_peers:
        return False
    if recipe.fused == "true":
        return True
    return FUSED_AUTO.get(device.type, False) and _stackable_arch(recipe.arch)


def data_recipe(spec: RunSpec) -> Recipe:
    """The recipe the data module is built from: ``view_augments`` only reach a method that
    asks for per-network views, so a single-view run is not held to augmentations it never uses."""
    recipe, cfg = spec.resolved()
    if recipe.view_augments and get_method(spec.method).views_for(cfg) == 1:
        recipe = replace(recipe, view_augments="")
    return recipe
