"""Compile the sharded training and evaluation steps for a TPU topology, from any host.

    python train/compile.py --topology=NAME [--preset=NAME] [--out=REPORT.json] [--KEY=VALUE ...]

e.g. ``--topology=v5e:2x2 --preset=tiny`` or ``--topology=v5p:4x4x4 --preset=1b --mesh_fsdp=64``.
Every train/main.py flag applies (the mesh is --mesh_data x --mesh_fsdp x --mesh_model over the
topology's devices). Nothing runs and nothing is allocated: libtpu's compiler builds the real TPU
program (the Pallas kernels included) and this prints, per device, XLA's memory analysis
(arguments, outputs, temporaries, generated code, peak), its cost analysis (FLOPs, bytes accessed)
and the compile times; exit status 2 with one line when the mesh does not match the topology, the
topology is unknown, libtpu is missing, or the training step does not fit the chip's HBM.
Needs the tpu extra: ``pip install -e '.[tpu]'``. The work is ``runway_jax.training.aot``.
"""

import argparse
import json
import os
import sys

from runway_jax.training.aot import CompileError, compile_train_step, fit_error, format_report, topology_devices
from runway_jax.training.cli import parse_flags
from runway_jax.training.config import TRAIN_PRESETS, ConfigError
from runway_jax.training.loop import make_mesh


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", default="default")
    first.add_argument("--topology", default=None)
    first.add_argument("--out", default=None)
    known, rest = first.parse_known_args(argv)
    try:
        config = parse_flags(rest, known.preset, description=(
            "Compile the sharded training and evaluation steps for a TPU topology.\n"
            "--topology=NAME  the TPU slice, e.g. v5e:2x2, v5e:4x4, v5p:4x4x4, v6e:2x2 (required)\n"
            f"--preset=NAME  starting configuration, one of {', '.join(sorted(TRAIN_PRESETS))} "
            f"(default: {first.get_default('preset')}); the flags below override it.\n"
            "--out=PATH  also write the report as JSON."))
        if not known.topology:
            raise ConfigError("--topology=NAME is required, e.g. --topology=v5e:2x2; see --help.")
        devices = topology_devices(known.topology)
        try:
            mesh = make_mesh(config, devices=devices)
        except ConfigError as error:
            raise ConfigError(f"{str(error).rstrip('.')} (--topology={known.topology}: {len(devices)} devices).") from None
        report = {"topology": known.topology, "preset": known.preset, **compile_train_step(config, mesh)}
    except (ConfigError, CompileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"topology {known.topology}, preset {known.preset}:")
    for line in format_report(report):
        print(f"  {line}")
    if known.out:
        os.makedirs(os.path.dirname(known.out) or ".", exist_ok=True)
        with open(known.out, "w") as handle:
            json.dump(report, handle, indent=2)
        print(f"wrote {known.out}")
    problem = fit_error(report)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
