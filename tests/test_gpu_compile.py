"""The GPU kernels compiled to PTX/SASS without a GPU (benchmarks/gpu_compile.py, issue 16).

The parsing and occupancy rules always run; the real compile runs when ``ptxas`` and the CUDA
plugin of this jaxlib are present (see the module docstring) and is skipped with the reason
otherwise."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_compile  # noqa: E402

from runway_jax.kernels import tiling  # noqa: E402

PTXAS_OUTPUT = """\
ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function 'runway_statistics' for 'sm_90a'
ptxas info    : Function properties for runway_statistics
    592 bytes stack frame, 704 bytes spill stores, 836 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 592 bytes cumulative stack size
"""


def test_ptxas_resources_reads_registers_spills_and_stack():
    assert gpu_compile.ptxas_resources(PTXAS_OUTPUT) == dict(
        registers=255, spill_store_bytes=704, spill_load_bytes=836, stack_frame_bytes=592,
        static_smem_bytes=0)


def test_occupancy_follows_registers_and_shared_memory():
    # 255 registers x 256 threads take the whole 64K register file: one program per SM.
    full = gpu_compile.occupancy("sm_90", registers=255, threads=256, smem_bytes=1024)
    assert full == dict(programs_per_sm=1, occupancy=0.125, smem_fits=True)
    # 64 registers x 128 threads: 8 by registers, but 40 KiB (+1 KiB reserved) allows 5 on sm_90.
    by_smem = gpu_compile.occupancy("sm_90", registers=64, threads=128, smem_bytes=40 * 1024)
    assert by_smem["programs_per_sm"] == 5
    # 200 KiB fits one program on sm_90 but is over sm_80's 163 KiB per block.
    assert gpu_compile.occupancy("sm_90", registers=32, threads=128,
                                 smem_bytes=200 * 1024)["smem_fits"]
    over = gpu_compile.occupancy("sm_80", registers=32, threads=128, smem_bytes=200 * 1024)
    assert over == dict(programs_per_sm=0, occupancy=0.0, smem_fits=False)


def test_missing_plugin_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv(gpu_compile.PLUGIN_DIR_VARIABLE, str(tmp_path))
    reason = gpu_compile._find_plugin()
    if not isinstance(reason, str):
        pytest.skip("a CUDA plugin is installed in this environment")
    assert "pip install --no-deps --target" in reason and str(tmp_path) in reason


def test_dominated_candidates_are_skipped_after_a_failure():
    small = tiling.BlockSizes(block_q=32, block_k=32, heads_per_program=1, num_warps=4,
                              num_stages=1)
    large = tiling.BlockSizes(block_q=64, block_k=32, heads_per_program=2, num_warps=4,
                              num_stages=2)
    assert gpu_compile._dominates(small, large) and not gpu_compile._dominates(large, small)
    other_warps = tiling.BlockSizes(block_q=64, block_k=64, heads_per_program=2, num_warps=8)
    assert not gpu_compile._dominates(small, other_warps)


def _toolchain_or_skip():
    try:
        return gpu_compile.find_toolchain()
    except RuntimeError as error:
        pytest.skip(str(error))


def test_the_four_kernels_compile_to_sass_at_a_small_shape():
    """Forward (2) and backward (2) Triton kernels through the plugin's Triton and ptxas."""
    _toolchain_or_skip()
    blocks = tiling.BlockSizes(block_q=16, block_k=16, heads_per_program=1, num_warps=4,
                               num_stages=1)
    report = gpu_compile.gpu_compile_report(blocks, archs=("sm_90",), length=32, heads=2,
                                            width=16)
    assert list(report["passes"]) == ["runway_statistics", "rewired_attention_forward",
                                      "rewired_attention_backward_queries",
                                      "rewired_attention_backward_keys"]
    assert report["compiled"], report
    for entry in report["passes"].values():
        result = entry["sm_90"]
        assert entry["num_warps"] == 4 and entry["num_stages"] == 1
        assert result["target"].startswith("sm_90") and 0 < result["registers"] <= 255
        assert 0 < result["smem_bytes"] and result["smem_fits"] and result["programs_per_sm"] > 0
    table = gpu_compile.format_report(report).splitlines()
    assert len(table) == 2 + 4 and all(" sm_90 " in line for line in table[2:])


def _fake_report(block_q, *, spill=0, occupancy=0.25, fits=True, heads_per_program=1):
    result = dict(spill_store_bytes=spill, spill_load_bytes=spill, occupancy=occupancy,
                  smem_fits=fits)
    report = dict(block_sizes=dict(block_q=block_q, block_k=block_q,
                                   heads_per_program=heads_per_program),
                  archs=["sm_90"], passes={"p": {"sm_90": result}}, spills=bool(spill))
    report["fails"] = gpu_compile._fails(report)
    return report


def test_recommend_prefers_spill_free_then_least_spilling_launchable():
    spilling = _fake_report(16, spill=100)
    worse = _fake_report(32, spill=900)
    too_big = _fake_report(64, fits=False)
    clean_low = _fake_report(64, occupancy=0.125)
    clean_high = _fake_report(32, occupancy=0.25)
    assert too_big["fails"] == "shared memory over the per-block limit"
    assert gpu_compile.recommend([spilling, clean_low, clean_high])[0] is clean_high
    assert gpu_compile.recommend([worse, spilling, too_big])[0] is spilling
    assert gpu_compile.recommend([too_big])[0] is None


def test_sweep_runs_every_probe_and_skips_grid_candidates_a_failure_dominates(monkeypatch):
    def sizes(q, w):
        return tiling.BlockSizes(block_q=q, block_k=q, heads_per_program=1, num_warps=w,
                                 num_stages=1)

    compiled = []

    def fake_report(block_sizes, **_):
        compiled.append(block_sizes)
        return _fake_report(block_sizes.block_q, spill=block_sizes.block_q >= 32)

    monkeypatch.setattr(gpu_compile, "gpu_compile_report", fake_report)
    probes = [sizes(32, 4), sizes(64, 4)]  # both spill, and both still run
    grid = [sizes(16, 8), sizes(128, 4), sizes(128, 8)]  # 128/4 is dominated by the 32/4 probe
    reports = gpu_compile.sweep(probes, grid, archs=("sm_90",), log=lambda _: None)
    assert compiled == [sizes(32, 4), sizes(64, 4), sizes(16, 8), sizes(128, 8)]
    assert [r["fails"] for r in reports] == ["spills", "spills", None, "spills"]
