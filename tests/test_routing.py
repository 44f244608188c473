"""Routing plan (PyTorch path): invariants, edge cases, errors, the one table of plan buffers, the topology
(``padded_offsets`` plus sizes), and the package's import graph (no cycle)."""

import ast
import dataclasses
import importlib
import pkgutil
from pathlib import Path

import pytest
import torch
from helpers import routing
from routing_cases import check_row_tokens, check_topology

import blocksparse_moe
from blocksparse_moe import routing as R
from blocksparse_moe.config import switch_table
from blocksparse_moe.routing import (
    PLAN_BUFFERS,
    SCRATCH_BUFFERS,
    PlanSizes,
    RoutingPlan,
    Topology,
    max_block_rows,
    plan_routing,
    pytorch,
)


def _loop_reference(idx: torch.Tensor, E: int):
    """Independent per-assignment loop: stable order by expert, then assignment index."""
    flat = idx.reshape(-1).tolist()
    order = [a for e in range(E) for a, x in enumerate(flat) if x == e]
    counts = [sum(1 for x in flat if x == e) for e in range(E)]
    return order, counts


CASES = [
    # (T, k, E, B, F, routing)
    (1, 1, 1, 4, 3, "distinct"),  # one token, E = 1
    (7, 3, 3, 4, 5, "distinct"),  # k = E, odd sizes
    (13, 2, 5, 4, 9, "distinct"),  # E not a power of two, F not a multiple of B
    (16, 2, 8, 4, 8, "one-hot"),  # all tokens to one expert (others empty)
    (9, 2, 6, 8, 4, "skip"),  # experts with no tokens in the middle, F < B
    (0, 2, 4, 4, 4, "distinct"),  # empty input
    (33, 4, 4, 16, 17, "duplicates"),  # duplicate experts within a row
]


@pytest.mark.parametrize("T,k,E,B,F,kind", CASES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_plan_invariants(T, k, E, B, F, kind, dtype):
    idx = routing(T, k, E, kind).to(dtype)
    before = idx.clone()
    p = plan_routing(idx, E, block_size=B)
    assert torch.equal(idx, before)  # input not modified
    A = T * k
    order, counts = _loop_reference(idx, E)
    assert p.row_assignment.tolist() == order  # stable by expert, then assignment index
    assert p.tokens_per_expert.tolist() == counts
    assert int(p.invalid_count) == 0
    assert p.offsets.tolist() == [sum(counts[:e]) for e in range(E + 1)]
    padded = [-(-c // B) * B for c in counts]
    assert p.padded_offsets.tolist() == [sum(padded[:e]) for e in range(E + 1)]
    # the unpadded maps are mutually inverse permutations
    ar = p.assignment_row.reshape(-1).long()
    assert torch.equal(p.row_assignment.long()[ar], torch.arange(A))
    assert torch.equal(ar[p.row_assignment.long()], torch.arange(A))
    # padded layout maps: mutually inverse, padding rows -1, each expert's rows in its padded range
    R = max_block_rows(A, E, B)
    assert p.padded_row_assignment.shape == (R * B,)
    pra, par = p.padded_row_assignment.long(), p.padded_assignment_row.reshape(-1).long()
    assert torch.equal(pra[par], torch.arange(A))
    assert int((pra >= 0).sum()) == A
    flat = idx.reshape(-1).long()
    for a in range(A):
        e = int(flat[a])
        assert p.padded_offsets[e] <= par[a] < p.padded_offsets[e] + counts[e]
        assert par[a] - p.padded_offsets[e] == ar[a] - p.offsets[e]  # same rank within the expert
    # the token of each row: its assignment // k (-1 for padding), from the loop reference
    assert p.row_token.tolist() == [a // k for a in order]
    assert p.padded_row_token.tolist() == [int(pra[r]) // k if pra[r] >= 0 else -1 for r in range(R * B)]
    check_row_tokens(p)
    # topology: the plan's padded_offsets (multiples of B, rising from 0) plus sizes
    t = p.topology(F)
    nb = -(-F // B)
    assert (t.block_size, t.num_experts, t.ffn_size, t.max_block_rows) == (B, E, F, R)
    assert torch.equal(t.padded_offsets, p.padded_offsets)
    assert t.blocks_per_expert == nb and t.nnz_max == R * nb and t.num_rows == R * B
    used = sum(padded) // B  # used block rows, from the loop reference's counts
    assert int(t.nnz) == used * nb <= t.nnz_max
    po = t.padded_offsets.tolist()
    owners = [[e for e in range(E) if po[e] <= r * B < po[e + 1]] for r in range(used)]
    assert all(len(o) == 1 and counts[o[0]] > 0 for o in owners)  # each used block row: one expert, with tokens
    check_topology(p, F)


def test_large_e_and_many_assignments():
    # E up to 512 and T·k near 1e6: still exact vs a stable argsort
    T, k, E = 250_000, 4, 512
    idx = torch.randint(0, E, (T, k), dtype=torch.int32)
    p = plan_routing(idx, E, block_size=128)
    assert torch.equal(p.row_assignment.long(), torch.argsort(idx.reshape(-1), stable=True))
    assert torch.equal(p.row_token.long(), torch.argsort(idx.reshape(-1), stable=True) // k)
    assert int(p.offsets[-1]) == T * k


def test_invalid_ids_raise_with_values():
    idx = torch.tensor([[0, 1], [5, -1]])
    with pytest.raises(ValueError, match=r"top_k_index must hold expert ids in \[0, 4\), got 2 outside .*\[5, -1\]"):
        plan_routing(idx, 4, block_size=4)


def test_invalid_ids_excluded_when_unchecked():
    idx = torch.tensor([[0, 7], [1, 0]])
    p = plan_routing(idx, 2, block_size=2, check=False)
    assert int(p.invalid_count) == 1
    assert p.counts.tolist() == [2, 1, 1]  # the histogram, then the invalid count
    assert p.tokens_per_expert.tolist() == [2, 1]
    assert p.assignment_row.tolist()[0][1] == -1
    assert p.padded_assignment_row.tolist()[0][1] == -1
    assert p.row_assignment.tolist() == [0, 3, 2, -1]  # stable by expert; the invalid row last, as -1
    assert p.row_token.tolist() == [0, 1, 1, -1]


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (
            dict(top_k_index=torch.zeros(3, dtype=torch.int64), num_experts=2),
            ValueError,
            r"top_k_index must have shape \[T, k\]",
        ),
        (dict(top_k_index=torch.zeros(3, 1), num_experts=2), TypeError, "top_k_index must have a dtype among"),
        (dict(top_k_index=torch.zeros(3, 0, dtype=torch.int64), num_experts=2), ValueError, "top_k >= 1"),
        (dict(top_k_index=torch.zeros(3, 1, dtype=torch.int64), num_experts=0), ValueError, "num_experts"),
        (dict(top_k_index=torch.zeros(3, 1, dtype=torch.int64), num_experts=2, block_size=0), ValueError, "block"),
        (dict(top_k_index=[[0]], num_experts=2), TypeError, "torch.Tensor"),
        # defect 6: a bool is not a size, and the error names the argument
        (
            dict(top_k_index=torch.zeros(3, 1, dtype=torch.int64), num_experts=2, block_size=True),
            ValueError,
            "block_size must be a positive int, got True",
        ),
        (
            dict(top_k_index=torch.zeros(3, 1, dtype=torch.int64), num_experts=True),
            ValueError,
            "num_experts must be a positive int, got True",
        ),
        (
            dict(top_k_index=torch.zeros(3, 1, dtype=torch.int64), num_experts=2, block_size=4.0),
            ValueError,
            "block_size must be a positive int, got 4.0",
        ),
        (
            dict(top_k_index=torch.zeros(3, 1, dtype=torch.int64), num_experts=2, implementation="cuda"),
            ValueError,
            "implementation must be one of",
        ),
    ],
)
def test_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        plan_routing(**kwargs)


def test_positional_bool_names_the_argument():
    # defect 6: plan_routing(idx, True) raised an error that did not name the argument
    with pytest.raises(ValueError, match="num_experts must be a positive int, got True"):
        plan_routing(torch.zeros(3, 1, dtype=torch.int64), True)


@pytest.mark.parametrize(
    "B, F, match",
    [
        (48, 64, r"power-of-two block_size, got block_size=48"),  # defect 6: accepted before
        (3, 8, r"power-of-two block_size, got block_size=3"),
        (4, 0, r"ffn_size must be a positive int, got 0"),
        (4, True, r"ffn_size must be a positive int, got True"),
    ],
)
def test_bad_topology(B, F, match):
    plan = plan_routing(torch.tensor([[0, 1], [1, 0]]), 2, block_size=B)  # any block size pads rows
    with pytest.raises(ValueError, match=match):
        plan.topology(F)


def test_package_import_is_lazy():
    # importing the package loads no kernels (no triton) and queries no device; names resolve on use
    import subprocess
    import sys

    code = (
        "import sys, blocksparse_moe as b; assert 'triton' not in sys.modules; "
        "assert 'blocksparse_moe._routing_cuda' not in sys.modules; b.moe_mlp; b.dMoE; b.ops.sdd; "
        "b.parallel.shard_experts; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


# ------------------------------------------------------------------------------ the one table of buffers


def _tensor_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if "Tensor" in str(f.type)]


def test_dataclass_fields_follow_the_table():
    # the dataclasses hold exactly the table's buffers, in table order
    assert _tensor_fields(RoutingPlan) == list(PLAN_BUFFERS)
    # the topology's only tensor is a plan buffer: it has no buffers of its own
    assert _tensor_fields(Topology) == ["padded_offsets"] and "padded_offsets" in PLAN_BUFFERS
    assert PlanSizes.buffer_names() == (*PLAN_BUFFERS, *SCRATCH_BUFFERS)


@pytest.mark.parametrize(
    "T,k,E,B,F",
    [
        (0, 2, 4, 4, 4),  # empty input: zero-length buffers, one-element offsets
        (13, 3, 5, 4, 9),  # odd sizes, partial column block
        (6, 2, 3, 1, 5),  # B = 1: unpadded rows, the padded buffers equal the unpadded ones
    ],
)
def test_plan_buffers_have_the_table_shapes(T, k, E, B, F):
    # the PyTorch path fills exactly the table's buffers with the table's shapes; the plan wraps them by name,
    # and the topology is the plan's padded_offsets (not a copy)
    idx = routing(T, k, E, "distinct")
    sizes = R.plan_sizes(idx, E, B)
    buffers = pytorch.plan_buffers(idx, sizes)
    assert {name: tuple(t.shape) for name, t in buffers.items()} == sizes.shapes()
    assert list(sizes.shapes()) == list(PLAN_BUFFERS)
    assert all(t.dtype == torch.int32 for t in buffers.values())
    plan = RoutingPlan.from_buffers(sizes, buffers)
    for name in PLAN_BUFFERS:
        assert getattr(plan, name) is buffers[name]
    assert plan.topology(F).padded_offsets is buffers["padded_offsets"]
    check_topology(plan, F)
    if B == 1:
        assert torch.equal(plan.padded_row_assignment, plan.row_assignment)
        assert torch.equal(plan.padded_row_token, plan.row_token)
        assert torch.equal(plan.padded_assignment_row, plan.assignment_row)


def test_topology_from_offsets():
    # the topology of any padded_offsets, the sizes as properties; empty experts (0 and 2), one partial column
    # block (F = 10, B = 4: nb = 3)
    po = torch.tensor([0, 0, 8, 8, 12], dtype=torch.int32)
    topo = Topology(block_size=4, num_experts=4, ffn_size=10, max_block_rows=5, padded_offsets=po)
    assert (topo.blocks_per_expert, topo.nnz_max, topo.num_rows) == (3, 15, 20)
    assert topo.nnz.shape == () and int(topo.nnz) == 9  # 3 used block rows · 3 blocks


def test_plan_sizes():
    # the sizes every buffer follows from; max_block_rows is min(A, (A + E·(B-1)) // B)
    s = PlanSizes(num_tokens=5, top_k=2, num_experts=3, block_size=4)
    assert (s.num_assignments, s.max_block_rows) == (10, 4)
    assert s.shapes() == {
        "counts": (4,),
        "offsets": (4,),
        "padded_offsets": (4,),
        "row_assignment": (10,),
        "row_token": (10,),
        "assignment_row": (5, 2),
        "padded_row_assignment": (16,),
        "padded_row_token": (16,),
        "padded_assignment_row": (5, 2),
    }
    # one tile of 256 assignments, one group: the counting sort's scratch
    assert (s.tile_size, s.num_tiles, s.tiles_per_group, s.num_groups) == (256, 1, 1, 1)
    assert s.scratch_shapes() == {"keys": (10,), "rank": (10,), "tile_counts": (4,), "group_counts": (4,)}


# ------------------------------------------------------------------------------ the import graph


def _package_modules() -> dict[str, Path]:
    root = Path(blocksparse_moe.__file__).parent
    modules = {"blocksparse_moe": root / "__init__.py"}
    for info in pkgutil.walk_packages([str(root)], prefix="blocksparse_moe."):
        spec = importlib.util.find_spec(info.name)
        if spec.origin and spec.origin.endswith(".py"):
            modules[info.name] = Path(spec.origin)
    return modules


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (function bodies and TYPE_CHECKING blocks
    included), resolved to module names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # "from pkg import name": the submodule pkg.name when it is one, else pkg itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _cycle(graph: dict[str, set[str]], members: set[str]) -> list[str] | None:
    """A cycle of ``graph`` restricted to ``members``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node] & members):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(members):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_routing_imports_have_no_cycle():
    # routing: the leaf spec, one module per implementation, the dispatcher above them; no cycle among the
    # package's modules, not even through an import in a function body; every module imports
    modules = _package_modules()
    assert {"blocksparse_moe.routing.spec", "blocksparse_moe.routing.pytorch"} <= set(modules)
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    routing_modules = {name for name in modules if name.startswith("blocksparse_moe.routing")}
    assert (
        _cycle(
            graph, routing_modules | {"blocksparse_moe.config", "blocksparse_moe.validation", "blocksparse_moe.info"}
        )
        is None
    )
    # a package __init__ imports its submodules; apart from those edges, nothing routing imports may import it
    assert graph["blocksparse_moe.routing.spec"] & routing_modules == set()  # the leaf
    for implementation in ("pytorch", "ext", "jit"):
        assert graph[f"blocksparse_moe.routing.{implementation}"] & routing_modules <= {"blocksparse_moe.routing.spec"}
    for name in sorted(routing_modules):
        importlib.import_module(name)


def test_package_imports_have_no_cycle():
    # the whole package: config/validation -> options -> routing -> backends/ops -> strategies -> functional ->
    # layers -> parallel/integrations, with no module importing one above it (function bodies included)
    modules = _package_modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    assert _cycle(graph, set(modules)) is None


def test_cycle_finder_finds_a_function_body_import(tmp_path):
    # the check above can fail: an import inside a function body counts
    path = tmp_path / "b.py"
    path.write_text("def f():\n    from . import a\n")
    graph = {"pkg.a": {"pkg.b"}, "pkg.b": _imports("pkg.b", path, {"pkg.a", "pkg.b"})}
    assert _cycle(graph, {"pkg.a", "pkg.b"}) == ["pkg.a", "pkg.b", "pkg.a"]


# ------------------------------------------------------------------------------ the switch table


def test_readme_switch_table_is_the_config_table():
    # the README's switch table is exactly config.switch_table(), between its markers
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = "<!-- switch table: the text of blocksparse_moe.config.switch_table() (a test checks it) -->\n"
    body = readme[readme.index(start) + len(start) : readme.index("\n<!-- end of switch table -->")]
    assert body == switch_table()
