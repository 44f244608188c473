"""The compile audit (bench/audit.py) on tiny kernels defined here: this module is itself the kernel module the
audit imports (``compile_specs()`` below), so nothing depends on the library's kernels existing."""

from __future__ import annotations

import os
from types import SimpleNamespace

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


MM_SIG = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32"}
COPY_SIG = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"}


_SEEN_INTERPRET: list[str | None] = []  # TRITON_INTERPRET at each compile_specs() call


def compile_specs() -> list[CompileSpec]:
    _SEEN_INTERPRET.append(os.environ.get("TRITON_INTERPRET"))
    mm = dict(BM=64, BN=64, BK=32)
    return [
        # N and K are the row strides: aligned builds vectorise the loads and pipeline the K loop
        CompileSpec("mm[bf16,64x64x32]", _tiny_mm_kernel, MM_SIG, mm, num_warps=4, aligned=("N", "K")),
        # 512 fp32 over 128 threads: 4 per thread, one 128-bit load when x and n allow it
        CompileSpec("copy[fp32]", _tiny_copy_kernel, COPY_SIG, dict(BLOCK=512), is_matmul=False, aligned=("n",)),
        # a "matmul" without tl.dot: the audit must flag it on sm_90; no aligned ints (pointers only)
        CompileSpec("copy-flagged[fp32]", _tiny_copy_kernel, COPY_SIG, dict(BLOCK=512), is_matmul=True),
        # a config a launcher picks only for aligned operands
        CompileSpec("copy-aligned-only[fp32]", _tiny_copy_kernel, COPY_SIG, dict(BLOCK=512), is_matmul=False,
                    aligned=("n",), variants=("aligned",)),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    jobs = audit.collect_jobs([__name__])
    out = tmp_path_factory.mktemp("audit")
    return {(r.job.name, r.job.variant, r.job.cc): r for r in audit.run_audit(jobs, out, processes=2)}


def test_collect_jobs_covers_every_spec_variant_and_arch():
    jobs = audit.collect_jobs([__name__])
    both = ("unaligned", "aligned")
    expected = [(s.name, v, cc) for s in compile_specs()[:3] for v in both for cc in (80, 90)]
    expected += [("copy-aligned-only[fp32]", "aligned", cc) for cc in (80, 90)]
    assert [(j.name, j.variant, j.cc) for j in jobs] == expected
    # filters: a substring of "module.config", and variants
    only = audit.collect_jobs([__name__], (90,), only="test_audit.copy[", variants=("aligned",))
    assert [(j.name, j.variant, j.cc) for j in only] == [("copy[fp32]", "aligned", 90)]


def test_collect_jobs_lists_the_gpu_configs_while_interpreting(monkeypatch):
    # the specs are listed as the workers (which never interpret) list them; the caller's environment is kept
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _SEEN_INTERPRET.clear()
    audit.collect_jobs([__name__])
    assert _SEEN_INTERPRET == [None] and os.environ["TRITON_INTERPRET"] == "1"


def test_divisibility_attrs_mark_pointers_and_aligned_ints():
    spec = compile_specs()[0]
    idx = {a: (_tiny_mm_kernel.arg_names.index(a),) for a in ("a_ptr", "b_ptr", "c_ptr", "N", "K")}
    assert audit.divisibility_attrs(spec) == {i: [["tt.divisibility", 16]] for i in idx.values()}
    # edge: nothing to mark (no pointer, no aligned int): the aligned build would repeat the unaligned one
    bare = CompileSpec("bare", SimpleNamespace(arg_names=["n", "BLOCK"]), {"n": "i32"}, dict(BLOCK=16))
    assert audit.divisibility_attrs(bare) == {} and audit.build_variants(bare) == ("unaligned",)
    assert audit.build_variants(compile_specs()[3]) == ("aligned",)


def test_compile_spec_rejects_bad_fields():
    with pytest.raises(ValueError, match="variants"):
        CompileSpec("x", _tiny_copy_kernel, COPY_SIG, dict(BLOCK=512), variants=("odd",))
    with pytest.raises(ValueError, match="variants"):
        CompileSpec("x", _tiny_copy_kernel, COPY_SIG, dict(BLOCK=512), variants=())
    with pytest.raises(ValueError, match=r"integer arguments.*x_ptr"):
        CompileSpec("x", _tiny_copy_kernel, COPY_SIG, dict(BLOCK=512), aligned=("x_ptr",))
    with pytest.raises(ValueError, match=r"integer arguments.*BLOCK"):
        CompileSpec("x", _tiny_copy_kernel, COPY_SIG, dict(BLOCK=512), aligned=("BLOCK",))


@pytest.mark.parametrize("variant", ["unaligned", "aligned"])
def test_matmul_uses_tensor_cores(results, variant):
    sm90, sm80 = results["mm[bf16,64x64x32]", variant, 90], results["mm[bf16,64x64x32]", variant, 80]
    for r in (sm80, sm90):
        assert r.error is None, r.error
        assert r.registers and r.registers > 0
        assert (r.spill_stores, r.spill_loads, r.stack) == (0, 0, 0)
        assert r.shared is not None and r.shared > 0  # tiles staged in shared memory
        assert audit.problems(r) == []
    assert sm90.hgmma > 0  # Hopper wgmma path
    assert sm80.hmma > 0 and sm80.hgmma == 0  # Ampere mma.sync path


@pytest.mark.parametrize("cc", [80, 90])
def test_aligned_variant_is_the_specialised_build(results, cc):
    # the aligned build vectorises (128-bit loads / cp.async) and pipelines the K loop (more shared memory)
    un, al = results["mm[bf16,64x64x32]", "unaligned", cc], results["mm[bf16,64x64x32]", "aligned", cc]
    assert un.ld128 == 0 and al.ld128 > 0
    assert al.shared > un.shared
    copy_un, copy_al = results["copy[fp32]", "unaligned", cc], results["copy[fp32]", "aligned", cc]
    assert copy_un.ld128 == 0 and copy_al.ld128 > 0
    # pointers alone (n not known to be a multiple of 16) do not allow full-width vectors
    assert results["copy-flagged[fp32]", "aligned", cc].ld128 == 0
    assert results["copy-aligned-only[fp32]", "aligned", cc].ld128 > 0


def test_non_matmul_passes_without_mma(results):
    for variant in ("unaligned", "aligned"):
        r = results["copy[fp32]", variant, 90]
        assert r.error is None and r.hgmma == 0 and r.hmma == 0
        assert audit.problems(r) == []


def test_matmul_without_hgmma_is_flagged_on_sm90_only(results):
    for variant in ("unaligned", "aligned"):
        assert audit.problems(results["copy-flagged[fp32]", variant, 90]) == ["sm_90 matmul without HGMMA"]
        assert audit.problems(results["copy-flagged[fp32]", variant, 80]) == []


def test_table_lists_every_build(results):
    table = audit.format_table(list(results.values()))
    assert table.count("\n") == 1 + len(results)
    assert "sm_90 matmul without HGMMA" in table and "| ok |" in table
    assert "| mm[bf16,64x64x32] | aligned | sm_90 |" in table and "| copy[fp32] | unaligned | sm_80 |" in table


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
    sass = (
        "LDGSTS.E.BYPASS.128 [R23], desc[UR16][R18.64], P5 ;\n"
        "@!P0 LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;\n"
        "LDG.E.64 R6, desc[UR4][R2.64] ;\nLDGDEPBAR ;\nSTG.E.128 desc[UR4][R2.64], R4 ;\n"
    )
    assert audit.count_ld128(sass) == 2
    r = audit.BuildResult(audit.Job("m", 0, "k", 90), registers=255, spill_stores=40, spill_loads=36, hgmma=3)
    assert audit.problems(r) == ["spills 40 B stores / 36 B loads"]
    # empty logs (no ptxas output captured): nothing invented
    assert audit.parse_ptxas_log("") == {} and audit.parse_resource_usage("") == {}


def test_failed_build_is_reported():
    r = audit.compile_job(audit.Job(__name__, 99, "missing", 90), "/nonexistent")
    assert r.error and r.error.startswith("IndexError") and audit.problems(r) == [f"build failed: {r.error}"]
    # a variant the spec does not list (the launcher never runs it) is an error, not a silent build
    r = audit.compile_job(audit.Job(__name__, 3, "copy-aligned-only[fp32]", 90, "unaligned"), "/nonexistent")
    assert r.error and "variant 'unaligned' not in" in r.error


def test_main_exit_status(capsys):
    # the flagged spec makes the audit fail (unaligned only: the aligned-only spec drops out)
    assert audit.main(["--modules", __name__, "--arch", "90", "--variants", "unaligned", "--jobs", "2"]) == 1
    out = capsys.readouterr().out
    assert "sm_90 matmul without HGMMA" in out and "3 builds, 1 failing" in out
    # --only leaves the flagged spec out: exit 0
    assert audit.main(["--modules", __name__, "--arch", "90", "--only", "copy[", "--jobs", "1"]) == 0
    assert "2 builds, 0 failing" in capsys.readouterr().out
    # edge: nothing matches the filter
    assert audit.main(["--modules", __name__, "--only", "no-such-kernel"]) == 1
