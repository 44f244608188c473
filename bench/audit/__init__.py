"""Ahead-of-time compile audit of the Triton kernels: ``python -m bench.audit``.

Every module of ``blocksparse_moe.kernels`` that defines ``compile_specs()`` (a list of
``kernels.specs.CompileSpec``) is compiled without a GPU for sm_80, sm_90, sm_100 and sm_120 (``ARCHS``), in each
variant the spec lists: ``unaligned`` (no divisibility hints: odd shapes) and ``aligned`` (every pointer and the
spec's ``aligned`` integers marked ``tt.divisibility`` 16, as the JIT specialises realistic shapes: vector loads,
pipelined K loop); the aligned variant is skipped when it has nothing to mark.

Per build the audit reads registers, stack and spill bytes and ptxas's performance notes (its ``-v`` log, with a
fresh ``TRITON_CACHE_DIR`` so nothing comes from the cache, and ``cuobjdump --dump-resource-usage``), shared memory
(Triton's dynamic allocation + static), the shared-memory buffers of the pipelined loads (the TTGIR's
``ttg.local_alloc``), and, from the SASS: the MMA instructions, 128-bit global loads, TMA, and the main loop (the
innermost loop around the MMA instructions, found from its backward ``BRA``): instructions per MMA and the waits
inside it. The SASS of all builds of one architecture is disassembled in a few ``nvdisasm`` runs over the
concatenated text sections (``cuobjdump -xtext``): nvdisasm costs ~0.4 s per call whatever the input size.

Checks (``CHECKS``; docs/audit.md has the exact patterns): ``build``, ``spill``, ``mma`` (a matmul without the
architecture's tensor-core MMA: HGMMA on sm_90, tcgen05 on sm_100, HMMA on sm_80 / sm_120), ``c7515`` (ptxas
serialised the wgmma), ``pipeline`` (the main loop waits its cp.async copies or wgmma to zero every iteration),
``smem`` (over the architecture's per-block limit), and the per-FLOP checks of the launchers' aligned configs
(enforced on sm_90 and sm_100): ``issue`` (issue ratio above 0.75), ``intensity`` (MMA FLOPs per byte of operand
tiles below the spec's floor), ``occupancy`` (under 2 CTAs per SM, not persistent). Exit status 1 when a check
outside ``--report-only`` and the spec's ``waivers`` fails.
Builds run in a spawn process pool (``--jobs``, default 2) with ``TRITON_INTERPRET`` unset and
``TRITON_DEFAULT_FP_FUSION`` set explicitly (default 1); jobs with equal ``triton.compile`` inputs (``jobs.code_key``)
are compiled once and each judged under its own spec.

Modules: ``jobs`` (what to build, the builds), ``sass`` (reading ptxas logs, resource usage, TTGIR and SASS),
``report`` (checks and tables), ``__main__`` (the command line).
"""
