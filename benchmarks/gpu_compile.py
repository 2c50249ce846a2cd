"""Compile the Pallas GPU kernels to PTX and SASS on a machine without a GPU (issue 16, item 3).

    python benchmarks/gpu_compile.py [--archs=sm_80,sm_90] [--length=4096] [--heads=16]
        [--width=128] [--span=exact] [--sweep] [--out=benchmarks/results/gpu_compile.json]

How, step by step (nothing here needs a GPU or a CUDA driver):

1. ``jax.export(platforms=["cuda"])`` of the kernels' forward and ``value_and_grad`` (4
   pallas_calls: 2 forward, 2 backward passes). On jaxlib 0.10 each pallas_call is a
   ``__gpu$xla.gpu.triton`` custom call whose ``backend_config`` holds the Triton IR (TTIR, MLIR
   bytecode) and its ``num_warps`` / ``num_stages``.
2. The CUDA PJRT plugin *of the same jaxlib version* compiles that TTIR to PTX with the Triton
   that XLA itself uses (``cuda_plugin_extension.compile_triton_to_asm``; it only needs the
   compute capability) and reports the shared memory per program. The stand-alone ``triton``
   package is not used: its MLIR would have to match jaxlib's exactly to read the bytecode.
3. ``ptxas -v`` (CUDA toolkit) assembles the PTX to SASS and reports registers per thread, spill
   stores / loads and the stack frame (local memory per thread); occupancy follows from those
   and the shared memory (CUDA occupancy rules, per-arch limits in ``ARCH_LIMITS``).

The plugin is not a project dependency (about 480 MB, and installing it beside jax makes jax try
to start a CUDA backend). Install it into a separate folder, which this module loads by path:

    pip install --no-deps --target ~/.cache/runway_jax/cuda_plugin \\
        jax-cuda12-plugin==JAXLIB_VERSION jax-cuda12-pjrt==JAXLIB_VERSION

(or set ``RUNWAY_CUDA_PLUGIN_DIR`` to another such folder; a plugin installed in the environment
is used too). Without it, or without ``ptxas``, :func:`gpu_compile_report` raises a RuntimeError
saying which. ``H`` here is the number of query (rewired) heads, as in the kernel tests; it only
changes the grid, not a program's resources.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings

TRITON_CALL = "__gpu$xla.gpu.triton"
PLUGIN_DIR_VARIABLE = "RUNWAY_CUDA_PLUGIN_DIR"
DEFAULT_PLUGIN_DIR = os.path.expanduser("~/.cache/runway_jax/cuda_plugin")
CUDA_MAJORS = (13, 12)  # newest first

# Per-SM limits (CUDA C Programming Guide, "Compute capabilities" table): register file, shared
# memory per SM and the most one block may use (both less the 1 KiB the driver reserves per
# block), resident warps and blocks.
ARCH_LIMITS = {
    "sm_80": dict(registers=65536, smem_per_sm=167936, smem_per_block=166912, warps=64, blocks=32),
    "sm_90": dict(registers=65536, smem_per_sm=233472, smem_per_block=232448, warps=64, blocks=32),
    "sm_100": dict(registers=65536, smem_per_sm=233472, smem_per_block=232448, warps=64,
                   blocks=32),
}
RESERVED_SMEM_PER_BLOCK = 1024
REGISTER_UNIT = 256  # registers are allocated per warp in units of 256


@dataclasses.dataclass(frozen=True)
class Toolchain:
    """What turns TTIR into SASS: the CUDA plugin's Triton compiler and ``ptxas``."""

    compile_ttir: object  # (ttir_bytes, "9.0", num_warps, num_ctas, num_stages) -> result
    plugin: str  # e.g. "jax-cuda12-plugin 0.10.2"
    ptxas: str
    ptxas_version: str


@dataclasses.dataclass(frozen=True)
class TritonCall:
    """One pallas_call as lowered for CUDA: its name, TTIR bytecode and launch parameters."""

    name: str
    ttir: bytes
    num_warps: int
    num_stages: int
    grid: tuple


def _plugin_dir():
    return os.environ.get(PLUGIN_DIR_VARIABLE) or DEFAULT_PLUGIN_DIR


def _load_extension(folder, major):
    """The plugin's ``cuda_plugin_extension`` loaded by path, so that its folder never goes on
    ``sys.path`` (jax would find ``jax_plugins`` there and try to start a CUDA backend)."""
    path = next((os.path.join(folder, f"jax_cuda{major}_plugin", name)
                 for name in os.listdir(os.path.join(folder, f"jax_cuda{major}_plugin"))
                 if name.startswith("cuda_plugin_extension") and name.endswith(".so")), None)
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location(f"jax_cuda{major}_plugin.cuda_plugin_extension",
                                                  path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Kept in sys.modules: once the module object is collected, nanobind forgets its result
    # type ("Unable to convert function return value to a Python type").
    sys.modules[spec.name] = module
    return module


def _find_plugin():
    """``(extension module, pjrt library path, package name, version)`` or a reason string."""
    import jaxlib.version

    wanted = jaxlib.version.__version__
    seen = []
    folder = _plugin_dir()
    for major in CUDA_MAJORS:
        library = os.path.join(folder, "jax_plugins", f"xla_cuda{major}", "xla_cuda_plugin.so")
        package = os.path.join(folder, f"jax_cuda{major}_plugin")
        if not (os.path.exists(library) and os.path.isdir(package)):
            continue
        version = _read_version(os.path.join(package, "version.py"))
        seen.append(f"jax-cuda{major}-plugin {version} in {folder}")
        if version == wanted:
            return _load_extension(folder, major), library, f"jax-cuda{major}-plugin", version
    for major in CUDA_MAJORS:  # installed in the environment itself
        try:
            extension = importlib.import_module(f"jax_cuda{major}_plugin.cuda_plugin_extension")
            pjrt = importlib.import_module(f"jax_plugins.xla_cuda{major}")
        except ImportError:
            continue
        version = importlib.import_module(f"jax_cuda{major}_plugin.version").__version__
        library = os.path.join(os.path.dirname(pjrt.__file__), "xla_cuda_plugin.so")
        seen.append(f"jax-cuda{major}-plugin {version} (installed)")
        if version == wanted and os.path.exists(library):
            return extension, library, f"jax-cuda{major}-plugin", version
    found = f" (found {', '.join(seen)}: the version must equal jaxlib's)" if seen else ""
    return (f"the CUDA plugin of jaxlib {wanted} is missing{found}; install it with "
            f"`pip install --no-deps --target {folder} jax-cuda12-plugin=={wanted} "
            f"jax-cuda12-pjrt=={wanted}` or set {PLUGIN_DIR_VARIABLE} to such a folder")


def _read_version(path):
    text = open(path).read() if os.path.exists(path) else ""
    match = re.search(r"""_version\s*=\s*["']([^"']+)["']""", text)
    return match.group(1) if match else "unknown"


@functools.lru_cache(maxsize=1)
def find_toolchain() -> Toolchain:
    """The plugin's Triton compiler and ``ptxas``; RuntimeError naming what is missing."""
    from jax._src.lib import xla_client

    ptxas = shutil.which("ptxas")
    if ptxas is None:
        raise RuntimeError("gpu_compile: `ptxas` is not on PATH; install the CUDA toolkit "
                           "(12.8 or newer for sm_100) or add its bin/ folder to PATH.")
    plugin = _find_plugin()
    if isinstance(plugin, str):
        raise RuntimeError(f"gpu_compile: {plugin}.")
    extension, library, package, version = plugin
    if not hasattr(extension, "compile_triton_to_asm"):  # absent from the jaxlib 0.12 plugin
        raise RuntimeError(
            f"gpu_compile: {package} {version} has no Triton-to-PTX entry point "
            "(compile_triton_to_asm, which the jaxlib 0.10.2 plugin has); run this with jax/jaxlib "
            "0.10.2 and its plugin (the Python 3.11 environment).")
    c_api = xla_client.load_pjrt_plugin_dynamically("cuda", library)  # loads, starts no client
    banner = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release [^\n]*", banner)
    return Toolchain(compile_ttir=functools.partial(extension.compile_triton_to_asm, c_api),
                     plugin=f"{package} {version}", ptxas=ptxas,
                     ptxas_version=release.group(0) if release else banner.strip())


def triton_calls(block_sizes, *, length, heads, width, span="exact"):
    """The 4 Triton kernels of forward + backward at ``B = 1``, bf16, as lowered for CUDA."""
    import jax
    import jax.numpy as jnp
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir

    from runway_jax import kernels

    shape = jax.ShapeDtypeStruct
    args = ([shape((1, length, heads, width), jnp.bfloat16)] * 3
            + [shape((1, length, width), jnp.bfloat16)] * 2 + [shape((1, length), jnp.int32)])

    def loss_gradients(q, k, v, rq, rk, segments):  # value_and_grad keeps the forward kernels
        def loss(*a):
            out = kernels.rewired_attention(*a, implementation="pallas_gpu", beta=1.0,
                                            runway_coefficient="bilinear", runway_span=span,
                                            segment_ids=segments, scale=None,
                                            block_sizes=block_sizes)
            return out.astype(jnp.float32).sum()
        return jax.value_and_grad(loss, argnums=range(5))(q, k, v, rq, rk)

    with _lowering_for_a_gpu():
        exported = jax.export.export(
            jax.jit(loss_gradients), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
    calls = []
    with mlir.make_ir_context():
        module = ir.Module.parse(exported.mlir_module())
        for op in _walk(module.operation):
            if op.name != "stablehlo.custom_call":
                continue
            if ir.StringAttr(op.attributes["call_target_name"]).value != TRITON_CALL:
                continue
            config = ir.DictAttr(op.attributes["mhlo.backend_config"])
            number = lambda key: ir.IntegerAttr(config[key]).value
            calls.append(TritonCall(
                name=ir.StringAttr(config["name"]).value,
                ttir=ir.StringAttr(config["ir"]).value_bytes,
                num_warps=number("num_warps"), num_stages=number("num_stages"),
                grid=tuple(number(f"grid_{axis}") for axis in "xyz")))
    if not calls:
        raise RuntimeError(
            f"gpu_compile: the CUDA lowering of jax {jax.__version__} holds no {TRITON_CALL} "
            "custom call (newer JAX compiles Triton at lowering time, which needs a GPU); use "
            "the jax 0.10 environment.")
    return calls


@contextlib.contextmanager
def _lowering_for_a_gpu():
    """jax >= 0.11 asks the abstract mesh which GPU the Triton lowering is for (jax 0.10 assumes
    sm_90 by itself); the compute capability only gates float8 casts, which the kernels do not
    use, so one H100 serves every arch. Its deprecation warning of the Triton backend is known
    (issue 16) and not ours to act on here."""
    import jax

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The Pallas Triton backend is deprecated",
                                DeprecationWarning)
        if not hasattr(jax.sharding, "use_abstract_mesh"):
            yield
            return
        device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None,
                                             platform="gpu")
        with jax.sharding.use_abstract_mesh(
                jax.sharding.AbstractMesh((), (), abstract_device=device)):
            yield


def _walk(operation):
    for region in operation.regions:
        for block in region.blocks:
            for op in block.operations:
                yield op.operation
                yield from _walk(op.operation)


def ptxas_resources(ptxas_output: str) -> dict:
    """Registers, spills and stack of the (single) entry function in ``ptxas -v`` output."""
    def number(pattern):
        match = re.search(pattern, ptxas_output)
        return int(match.group(1)) if match else 0

    return dict(registers=number(r"Used (\d+) registers"),
                spill_store_bytes=number(r"(\d+) bytes spill stores"),
                spill_load_bytes=number(r"(\d+) bytes spill loads"),
                stack_frame_bytes=number(r"(\d+) bytes stack frame"),
                static_smem_bytes=number(r"(\d+) bytes smem"))


def occupancy(arch, *, registers, threads, smem_bytes) -> dict:
    """Resident programs per SM and the fraction of the SM's warp slots they fill."""
    limits = ARCH_LIMITS[arch]
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(max(registers, 1) * 32 / REGISTER_UNIT) * REGISTER_UNIT
    by_registers = limits["registers"] // (per_warp * warps)
    by_smem = limits["smem_per_sm"] // (smem_bytes + RESERVED_SMEM_PER_BLOCK)
    programs = min(by_registers, by_smem, limits["blocks"], limits["warps"] // warps)
    return dict(programs_per_sm=programs, occupancy=programs * warps / limits["warps"],
                smem_fits=smem_bytes <= limits["smem_per_block"])


def compile_call(toolchain: Toolchain, call: TritonCall, arch: str, folder: str) -> dict:
    """TTIR -> PTX (plugin's Triton) -> SASS (ptxas -v) for one arch; the resources used."""
    capability = arch.removeprefix("sm_")
    try:
        result = toolchain.compile_ttir(call.ttir, f"{capability[:-1]}.{capability[-1]}",
                                        call.num_warps, 1, call.num_stages)
    except Exception as error:  # out of shared memory etc.: a result of the sweep, not a crash
        return dict(error=f"triton: {str(error).strip().splitlines()[0][:300]}")
    ptx = result.asm if isinstance(result.asm, str) else result.asm.decode()
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)  # sm_90a: wgmma needs the "a"
    ptx_path = os.path.join(folder, f"{call.name}.{arch}.ptx")
    with open(ptx_path, "w") as handle:
        handle.write(ptx)
    assembled = subprocess.run([toolchain.ptxas, f"-arch={target}", "-v", ptx_path, "-o",
                                ptx_path.replace(".ptx", ".cubin")],
                               capture_output=True, text=True)
    if assembled.returncode:
        return dict(error=f"ptxas: {assembled.stderr.strip().splitlines()[-1][:300]}")
    resources = ptxas_resources(assembled.stdout + assembled.stderr)
    smem = int(result.smem_bytes) + resources["static_smem_bytes"]
    return dict(target=target, smem_bytes=smem, **resources,
                **occupancy(arch, registers=resources["registers"],
                            threads=32 * call.num_warps, smem_bytes=smem))


def gpu_compile_report(block_sizes=None, archs=("sm_80", "sm_90"), length=4096, heads=16,
                       width=128, span="exact") -> dict:
    """Compile the 4 Triton kernels for each arch; per pass registers, spills, shared memory.

    Returns ``{"block_sizes", "archs", "shape", "toolchain", "passes": {name: {"grid",
    "num_warps", "num_stages", arch: {...}}}, "compiled": bool, "spills": bool}``; an arch
    whose compile failed carries ``{"error": ...}``. RuntimeError when the toolchain is
    missing (see the module docstring).
    """
    import jax

    from runway_jax.kernels import tiling

    block_sizes = block_sizes or tiling.BlockSizes.gpu_default()
    unknown = [arch for arch in archs if arch not in ARCH_LIMITS]
    if unknown:
        raise ValueError(f"gpu_compile: archs {unknown} are not among {sorted(ARCH_LIMITS)}.")
    toolchain = find_toolchain()
    passes = {}
    with tempfile.TemporaryDirectory(prefix="gpu_compile_") as folder:
        for call in triton_calls(block_sizes, length=length, heads=heads, width=width,
                                 span=span):
            passes[call.name] = dict(grid=list(call.grid), num_warps=call.num_warps,
                                     num_stages=call.num_stages,
                                     **{arch: compile_call(toolchain, call, arch, folder)
                                        for arch in archs})
    results = [passes[name][arch] for name in passes for arch in archs]
    return dict(block_sizes=dataclasses.asdict(block_sizes), archs=list(archs),
                shape=dict(length=length, heads=heads, width=width, dtype="bfloat16", span=span),
                toolchain=dict(jax=jax.__version__, plugin=toolchain.plugin,
                               ptxas=toolchain.ptxas_version),
                passes=passes,
                compiled=all("error" not in r for r in results),
                spills=any(r.get("spill_store_bytes", 0) or r.get("spill_load_bytes", 0)
                           for r in results))


def sweep_candidates():
    """``(probes, grid)``: probes always run (the smallest tiles, where a kernel that spills
    everywhere still shows how little it can spill); the grid -- blocks 32/64/128 (square and
    2:1), heads per program 1/2/4, 4 or 8 warps, 1-3 pipeline stages -- smallest first."""
    from runway_jax.kernels import tiling

    def sizes(q, k, g, w, s):
        return tiling.BlockSizes(block_q=q, block_k=k, heads_per_program=g, num_warps=w,
                                 num_stages=s)

    probes = [sizes(16, 16, 1, 4, 1), sizes(32, 32, 1, 4, 1), sizes(32, 32, 1, 8, 1)]
    blocks = [(32, 32), (64, 32), (32, 64), (64, 64), (128, 64), (128, 128)]
    grid = [sizes(q, k, g, w, s) for q, k in blocks for g in (1, 2, 4) for w in (4, 8)
            for s in (1, 2, 3)]
    grid = sorted((c for c in grid if c not in probes),
                  key=lambda c: (c.block_q * c.block_k, c.heads_per_program, c.num_stages,
                                 c.num_warps))
    return probes, grid


def _fails(report):
    """Why a report is not usable (spills, too much shared memory, no compile), or None."""
    results = [p[arch] for p in report["passes"].values() for arch in report["archs"]]
    if any("error" in r for r in results):
        return "compile error"
    if report["spills"]:
        return "spills"
    if not all(r["smem_fits"] for r in results):
        return "shared memory over the per-block limit"
    return None


def _dominates(small, large):
    """``large`` needs at least ``small``'s registers and shared memory (same warps/stages
    or more stages)."""
    return (small.num_warps == large.num_warps and small.num_stages <= large.num_stages
            and small.block_q <= large.block_q and small.block_k <= large.block_k
            and small.heads_per_program <= large.heads_per_program)


def sweep(probes=None, grid=None, archs=("sm_80", "sm_90"), log=print, **shape) -> list:
    """:func:`gpu_compile_report` for every probe, then for each grid candidate that no failed
    smaller one dominates (more tile, heads or stages only add registers and shared memory)."""
    if probes is None and grid is None:
        probes, grid = sweep_candidates()
    failed, reports = [], []
    probes = list(probes or [])
    for candidate in probes + list(grid or []):
        if candidate not in probes and any(_dominates(small, candidate) for small in failed):
            continue
        report = gpu_compile_report(candidate, archs=archs, **shape)
        report["fails"] = _fails(report)
        if report["fails"]:
            failed.append(candidate)
        reports.append(report)
        log(f"{_label(candidate)}: {report['fails'] or 'ok'}, worst occupancy "
            f"{_worst_occupancy(report):.3f}, spilled {_spilled_bytes(report)} B")
    return reports


def _spilled_bytes(report):
    return sum(r.get("spill_store_bytes", 0) + r.get("spill_load_bytes", 0)
               for p in report["passes"].values() for arch in report["archs"] for r in [p[arch]])


def _worst_occupancy(report):
    return min((r.get("occupancy", 0.0) for p in report["passes"].values()
                for arch in report["archs"] for r in [p[arch]]), default=0.0)


def recommend(reports):
    """``(report, why)``: the spill-free candidate within the shared-memory limit with the best
    worst-pass occupancy (ties: more heads per program, so rho is formed fewer times, METHOD
    (3c); then larger tiles). When none is spill-free: the one that launches (compiles, shared
    memory within the limit) and spills the fewest bytes; ``(None, why)`` when none launches."""
    usable = [r for r in reports if not r["fails"]]
    if usable:
        def rank(report):
            sizes = report["block_sizes"]
            return (_worst_occupancy(report), sizes["heads_per_program"],
                    sizes["block_q"] * sizes["block_k"])
        best = max(usable, key=rank)
        return best, "no spills, best occupancy"
    launchable = [r for r in reports if r["fails"] == "spills"]
    if launchable:
        return (min(launchable, key=_spilled_bytes),
                "no candidate is spill-free; this one launches and spills the least")
    return None, "no candidate compiles within the shared-memory limit"


def _label(block_sizes):
    b = block_sizes if isinstance(block_sizes, dict) else dataclasses.asdict(block_sizes)
    return (f"Bq={b['block_q']} Bk={b['block_k']} G'={b['heads_per_program']} "
            f"warps={b['num_warps']} stages={b['num_stages']}")


def format_report(report) -> str:
    lines = [f"{_label(report['block_sizes'])}  ({report['toolchain']['plugin']}, ptxas "
             f"{report['toolchain']['ptxas']})",
             f"{'pass':36} {'arch':7} {'regs':>4} {'spill st/ld B':>14} {'stack B':>8} "
             f"{'smem KiB':>9} {'fits':>5} {'prog/SM':>7} {'occup':>6}"]
    for name, entry in report["passes"].items():
        for arch in report["archs"]:
            r = entry[arch]
            if "error" in r:
                lines.append(f"{name:36} {arch:7} {r['error']}")
                continue
            lines.append(
                f"{name:36} {arch:7} {r['registers']:>4} "
                f"{r['spill_store_bytes']:>6}/{r['spill_load_bytes']:<7} "
                f"{r['stack_frame_bytes']:>8} "
                f"{r['smem_bytes'] / 1024:>9.1f} {'yes' if r['smem_fits'] else 'NO':>5} "
                f"{r['programs_per_sm']:>7} {r['occupancy']:>6.3f}")
    return "\n".join(lines)


def main(argv=None):
    from runway_jax import attention
    from runway_jax.kernels import tiling

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="sm_80,sm_90")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--span", default="exact", choices=attention.RUNWAY_SPANS)
    parser.add_argument("--sweep", action="store_true",
                        help="also try the alternatives of sweep_candidates() and recommend one")
    parser.add_argument("--out", default="benchmarks/results/gpu_compile.json")
    args = parser.parse_args(argv)
    archs = tuple(a for a in args.archs.split(",") if a)
    bad = [a for a in archs if a not in ARCH_LIMITS]
    if bad:
        print(f"gpu_compile: --archs {bad} are not among {sorted(ARCH_LIMITS)}.", file=sys.stderr)
        return 2
    shape = dict(length=args.length, heads=args.heads, width=args.width, span=args.span)
    try:
        default = gpu_compile_report(tiling.BlockSizes.gpu_default(), archs=archs, **shape)
    except RuntimeError as error:
        print(error, file=sys.stderr)
        return 2
    default["fails"] = _fails(default)
    print(format_report(default))
    results = dict(default=default)
    if args.sweep:
        reports = sweep(archs=archs, **shape)
        best, why = recommend(reports)
        results.update(sweep=reports, recommended=best and best["block_sizes"],
                       recommended_because=why)
        print(f"recommended: {_label(best['block_sizes'])} ({why})" if best else why)
        if best:
            print(format_report(best))
    from common import write_results  # benchmarks/common.py

    write_results(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
