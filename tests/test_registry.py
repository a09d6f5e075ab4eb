"""Methods, architectures and datasets share one registry: a name registered twice is refused,
an unknown name is a one-line UsageError that lists the known ones."""
from __future__ import annotations

import pytest

from kd_platform import data, methods, models
from kd_platform.errors import UsageError
from kd_platform.registry import Registry


@pytest.mark.parametrize("registry, existing", [(methods._METHODS, "okdph"), (models._BUILDERS, "resnet8"),
                                                (data._BUILDERS, "digits")])
def test_a_name_is_registered_once(registry, existing):
    assert existing in registry
    with pytest.raises(ValueError, match=f"'{existing}' registered twice"):
        registry.add(existing, object())


@pytest.mark.parametrize("lookup, kind", [(methods.get_method, "method"),
                                          (lambda n: models.build_model(n, 10), "architecture"),
                                          (lambda n: data._BUILDERS.get(n), "dataset")])
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
