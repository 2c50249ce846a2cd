"""pyproject.toml's filterwarnings: a DeprecationWarning that a library raises for our call (the
module the warning is attributed to after its stacklevel is ours) fails the test; one attributed
to the library's own code stays a warning."""

import warnings

import pytest


def deprecated_api():
    """What jax, flax, orbax and grain do: warn on behalf of the caller."""
    warnings.warn("deprecated_api is deprecated", DeprecationWarning, stacklevel=2)


def call_from(module_name):
    """Call :func:`deprecated_api` from code whose module is ``module_name``."""
    exec(compile("deprecated_api()", module_name.replace(".", "/") + ".py", "exec"),
         {"__name__": module_name, "deprecated_api": deprecated_api})


@pytest.mark.parametrize("module_name", ["runway_jax", "runway_jax.kernels.gpu", "test_kernels",
                                         "conftest", "perplexity", "study"])
def test_a_deprecated_call_from_our_code_is_an_error(module_name):
    with pytest.raises(DeprecationWarning, match="deprecated_api is deprecated"):
        call_from(module_name)


@pytest.mark.parametrize("module_name", ["orbax.checkpoint.checkpoint_manager", "jax._src.pallas",
                                         "flax.nnx", "reporting", "study_tools"])
def test_a_deprecated_call_inside_a_library_stays_a_warning(module_name):
    with pytest.warns(DeprecationWarning, match="deprecated_api is deprecated"):
        call_from(module_name)


def test_this_test_module_is_ours():
    with pytest.raises(DeprecationWarning):
        deprecated_api()
