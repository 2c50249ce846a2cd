"""What every benchmark script shares: writing its results as JSON (atomically, so an interrupted
benchmark leaves the previous results whole)."""

import os

from runway_jax.files import write_json


def write_results(results: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_json(path, results)
    print(f"wrote {path}")
