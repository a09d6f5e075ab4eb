"""Methods, architectures and datasets share one registry: a name registered twice is refused,
an unknown name is a one-line UsageError that lists the known ones."""
from __future__ import annotations

import pytest

from kd_platform import methods, models
from kd_platform.data import registry as data_registry
from kd_platform.errors import UsageError
from kd_platform.methods import registry as method_registry
from kd_platform.models import registry as model_registry
from kd_platform.registry import Registry


@pytest.mark.parametrize("registry, existing", [(method_registry._METHODS, "okdph"),
                                                (model_registry._BUILDERS, "resnet8"),
                                                (data_registry._BUILDERS, "digits")])
def test_a_name_is_registered_once(registry, existing):
    assert existing in registry
    with pytest.raises(ValueError, match=f"'{existing}' registered twice"):
        registry.add(existing, object())


@pytest.mark.parametrize("lookup, kind", [(methods.get_method, "method"),
                                          (lambda n: models.build_model(n, 10), "architecture"),
                                          (lambda n: data_registry._BUILDERS.get(n), "dataset")])
def test_an_unknown_name_lists_the_known_ones(lookup, kind):
    with pytest.raises(UsageError) as err:
        lookup("nosuch")
    assert str(err.value).startswith(f"unknown {kind} 'nosuch'; known {kind}s: ")
    assert "\n" not in str(err.value)


def test_entries_load_on_first_use_only():
    reg: Registry[int] = Registry("thing", "kd_platform.methods", methods.__path__, skip=("base",))
    assert not reg._loaded
    reg.add("x", 1)
    assert reg.get("x") == 1 and reg._loaded


def test_search_spaces_fix_only_what_differs_from_the_defaults():
    """Defaults live in one place (the method's Config and the Recipe): a space lists what it
    sweeps and what it changes, so a default moved in the code is not silently overridden."""
    from dataclasses import fields

    from kd_platform.config.knobs import build_config, knob_specs
    from kd_platform.config.recipe import Recipe
    from kd_platform.sweep.space import load_space
    for method in methods.method_names():
        cls = methods.get_method(method).Config
        space = load_space(method, None)
        for key, value in space.fixed.items():
            where = cls if key in knob_specs(cls) else Recipe
            default = getattr(build_config(where, {}), key)
            assert getattr(build_config(where, {key: value}), key) != default, (method, key)
        assert {f.name for f in fields(cls)} >= set(space.swept) - set(knob_specs(Recipe))
