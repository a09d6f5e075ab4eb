"""Every registered method: a short run on digits learns (validation accuracy above chance)
and logs every named loss term of its training step to MLflow."""
from __future__ import annotations

import pytest
import torch
from conftest import DataStub, runs_in, sqlite_uri

from kd_platform.config.knobs import knob_specs
from kd_platform.methods import get_method, method_names
from kd_platform.methods.base import Batch, StepContext
from kd_platform.run.engine import RunSpec, build_method
from kd_platform.run.spec import Assets

pytestmark = pytest.mark.slow
CHANCE = 10.0  # digits has 10 balanced classes


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory):
    """One teacher cache shared by the offline methods, as a sweep shares it between trials."""
    return tmp_path_factory.mktemp("teachers")


def _loss_terms(spec: RunSpec) -> set[str]:
    """The terms one training step returns, asked of the method directly (not of MLflow)."""
    torch.manual_seed(0)
    provider = None
    if get_method(spec.method).kind == "offline":  # the run before this filled the teacher cache
        from kd_platform.teachers import TeacherProvider
        provider = TeacherProvider(spec, DataStub(), torch.device("cpu"))
    method = build_method(spec, DataStub(), torch.device("cpu"), provider)
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(16, 1, 8, 8, generator=g) for _ in range(method.num_views())]
    return set(method.training_step(Batch(views, torch.arange(16) % 10), StepContext(0, 2, 0, 1, 0)))


@pytest.mark.parametrize("method", method_names())
def test_method_learns_on_digits_and_logs_every_term(method, tmp_path, teacher_cache):
    from kd_platform.launch.launcher import Launch
    from kd_platform.launch.single import run_single
    torch.set_num_threads(2)
    knobs = {"epochs": 3, "lr": 0.05}
    assets = Assets()
    if get_method(method).kind == "offline":
        knobs["teacher_epochs"] = 3
        assets = Assets(teacher_cache=str(teacher_cache))
    if "ae_epochs" in knob_specs(get_method(method).Config):
        knobs["ae_epochs"] = 3  # IE-KD's stage-A auto-encoder: enough to learn on digits
    spec = RunSpec.from_flat(method, knobs, seed=0, assets=assets)
    uri = sqlite_uri(tmp_path / "m.db")
    result = run_single(spec, Launch(), uri, method, tmp_path / "res")
    (run,) = runs_in(uri)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["val/acc/students_mean"] > 2 * CHANCE, run.data.metrics
    logged = {k[len("train/loss/"):] for k in run.data.metrics if k.startswith("train/loss/")}
    assert logged == _loss_terms(spec) and "loss" in logged
    assert result["metrics"]["test/acc/students_mean"] == run.data.metrics["test/acc/students_mean"]
