"""The compile audit (bench/audit.py) on tiny kernels defined here: this module is itself the kernel module the
audit imports (``compile_specs()`` below), so nothing depends on the library's kernels existing."""

from __future__ import annotations

import pytest
import triton
import triton.language as tl

from bench import audit
from blocksparse_moe.kernels._common import CompileSpec


@triton.jit
def _tiny_mm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # a [M, K], b [K, N], c [M, N], all row-major
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None].to(tl.int64) * K + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K))
        b = tl.load(b_ptr + kk[:, None].to(tl.int64) * N + rn[None, :], mask=(kk[:, None] < K) & (rn[None, :] < N))
        acc += tl.dot(a, b)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tiny_copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    # x [n] -> y [n]
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def compile_specs() -> list[CompileSpec]:
    mm_sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32"}
    copy_sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"}
    return [
        CompileSpec("mm[bf16,64x64x32]", _tiny_mm_kernel, mm_sig, dict(BM=64, BN=64, BK=32), num_warps=4),
        CompileSpec("copy[fp32]", _tiny_copy_kernel, copy_sig, dict(BLOCK=256), is_matmul=False),
        # a "matmul" without tl.dot: the audit must flag it on sm_90
        CompileSpec("copy-flagged[fp32]", _tiny_copy_kernel, copy_sig, dict(BLOCK=256), is_matmul=True),
    ]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    jobs = audit.collect_jobs([__name__])
    out = tmp_path_factory.mktemp("audit")
    return {(r.job.name, r.job.cc): r for r in audit.run_audit(jobs, out, processes=2)}


def test_collect_jobs_covers_every_spec_and_arch():
    jobs = audit.collect_jobs([__name__])
    assert [(j.name, j.cc) for j in jobs] == [(s.name, cc) for s in compile_specs() for cc in (80, 90)]


def test_matmul_uses_tensor_cores(results):
    sm90, sm80 = results["mm[bf16,64x64x32]", 90], results["mm[bf16,64x64x32]", 80]
    for r in (sm80, sm90):
        assert r.error is None, r.error
        assert r.registers and r.registers > 0
        assert (r.spill_stores, r.spill_loads, r.stack) == (0, 0, 0)
        assert r.shared is not None and r.shared > 0  # tiles staged in shared memory
        assert audit.problems(r) == []
    assert sm90.hgmma > 0  # Hopper wgmma path
    assert sm80.hmma > 0 and sm80.hgmma == 0  # Ampere mma.sync path


def test_non_matmul_passes_without_mma(results):
    r = results["copy[fp32]", 90]
    assert r.error is None and r.hgmma == 0 and r.hmma == 0
    assert audit.problems(r) == []


def test_matmul_without_hgmma_is_flagged_on_sm90_only(results):
    assert audit.problems(results["copy-flagged[fp32]", 90]) == ["sm_90 matmul without HGMMA"]
    assert audit.problems(results["copy-flagged[fp32]", 80]) == []


def test_table_lists_every_build(results):
    table = audit.format_table(list(results.values()))
    assert table.count("\n") == 1 + len(results)
    assert "sm_90 matmul without HGMMA" in table and "| ok |" in table


def test_parsers_read_spills_and_resources():
    # spills: a register-heavy build as ptxas reports it
    log = (
        "ptxas info    : Used 255 registers, used 1 barriers, 584 bytes cmem[0]\n"
        "ptxas info    : Function properties for k\n"
        "    48 bytes stack frame, 40 bytes spill stores, 36 bytes spill loads\n"
    )
    assert audit.parse_ptxas_log(log) == dict(registers=255, stack=48, spill_stores=40, spill_loads=36)
    usage = " Function k:\n  REG:128 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:584 TEXTURE:0"
    assert audit.parse_resource_usage(usage) == dict(registers=128, stack=0, static_shared=1024, local=0)
    r = audit.BuildResult(audit.Job("m", 0, "k", 90), registers=255, spill_stores=40, spill_loads=36, hgmma=3)
    assert audit.problems(r) == ["spills 40 B stores / 36 B loads"]
    # empty logs (no ptxas output captured): nothing invented
    assert audit.parse_ptxas_log("") == {} and audit.parse_resource_usage("") == {}


def test_failed_build_is_reported():
    r = audit.compile_job(audit.Job(__name__, 99, "missing", 90), "/nonexistent")
    assert r.error and r.error.startswith("IndexError") and audit.problems(r) == [f"build failed: {r.error}"]


def test_main_exit_status(capsys):
    # the flagged spec makes the audit fail
    assert audit.main(["--modules", __name__, "--arch", "90", "--jobs", "2"]) == 1
    out = capsys.readouterr().out
    assert "sm_90 matmul without HGMMA" in out and "3 builds, 1 failing" in out
