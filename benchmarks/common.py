"""What every benchmark script shares: writing its results as JSON."""

import json
import os


def write_results(results: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"wrote {path}")
