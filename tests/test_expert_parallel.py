"""Expert parallelism: W gloo processes on CPU (torch.multiprocessing.spawn) against one process holding all
experts. Each spawn runs a list of cases so that process start-up (importing torch) is paid once per test.

Workers run the ``torch`` backend of ``moe_mlp`` (``BSM_BACKEND=torch``): the interpreter would only make the
local expert compute slow, and the kernels have their own tests; what is tested here is the transport.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import pytest
import torch
import torch.distributed as dist
from helpers import routing
from multiprocess import spawn

from blocksparse_moe.functional import moe_mlp
from blocksparse_moe.parallel.expert_parallel import (
    ep_combine,
    ep_dispatch,
    expert_parallel,
    expert_parallel_moe_mlp,
    gather_experts,
    shard_experts,
)
from blocksparse_moe.reference import per_token_moe_mlp

FP32 = dict(atol=1e-4, rtol=1e-4)
IMPL = "auto"  # "grouped"


@dataclass(frozen=True)
class Case:
    name: str  # the edge the case covers
    tokens: tuple[int, ...]  # tokens per rank (cycled over the ranks)
    k: int | None  # None: k = E
    experts_per_rank: int
    d: int
    f: int
    routing: str  # rank0 | not_last | a kind of helpers.routing (uniform, one-hot)
    glu: bool
    activation: str = "gelu"

    def fits(self, world: int) -> bool:
        """Whether the routing exists with ``world`` ranks (distinct uniform choices need k <= E)."""
        E = self.experts_per_rank * world
        return (self.routing != "not_last" or world > 1) and (self.routing != "uniform" or (self.k or E) <= E)


CASES = [
    Case("uniform routing, odd sizes, GLU", (7, 5), 2, 2, 13, 11, "uniform", True),
    Case("uniform routing, no GLU, relu, k = 1", (9,), 1, 1, 10, 7, "uniform", False, "relu"),
    Case(
        "skewed: every token to rank 0's experts; other ranks' experts get no tokens",
        (6, 3),
        2,
        2,
        8,
        9,
        "rank0",
        True,
        "silu",
    ),
    Case("the last rank's experts get no tokens", (5, 8), 2, 1, 9, 6, "not_last", False),
    Case("all tokens to one expert (E // 2)", (4, 6), 1, 2, 7, 5, "one-hot", True),
    Case("k = E with one expert per rank (every token visits every rank)", (3, 4), None, 1, 6, 5, "uniform", True),
    Case("a rank with no tokens (T = 0) and one with one token", (0, 1, 5), 2, 1, 8, 8, "uniform", False),
]


def _data(case: Case, world: int, seed: int):
    """The whole problem over all ranks, identical on every rank (seeded generator)."""
    g = torch.Generator().manual_seed(seed)
    E = case.experts_per_rank * world
    k = case.k or E
    counts = [case.tokens[r % len(case.tokens)] for r in range(world)]
    T = sum(counts)
    x = torch.randn(T, case.d, generator=g)
    if case.routing == "rank0":  # experts [0, E_l): rank 0's
        idx = routing(T, k, case.experts_per_rank, "random", generator=g)
    elif case.routing == "not_last":  # experts [0, E - E_l): none of the last rank's
        idx = routing(T, k, E - case.experts_per_rank, "random", generator=g)
    else:
        idx = routing(T, k, E, case.routing, generator=g)
    weights = torch.rand(T, k, generator=g)
    w1 = torch.randn(E, case.d, case.f, generator=g) / case.d**0.5
    w2 = torch.randn(E, case.f, case.d, generator=g) / case.f**0.5
    w3 = torch.randn(E, case.d, case.f, generator=g) / case.d**0.5 if case.glu else None
    grad = torch.randn(T, case.d, generator=g)
    return counts, x, idx, weights, (w1, w2, w3), grad


def _forward_backward(fn, x, idx, weights, ws, grad):
    leaves = [t.clone().requires_grad_() for t in (x, weights, *[w for w in ws if w is not None])]
    x, weights, *w = leaves
    if ws[2] is None:
        w.append(None)
    out = fn(x, idx, weights, *w)
    (out * grad).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def _check_cases(rank: int, world: int, cases: list[Case], device: str = "cpu") -> None:
    device = torch.device(device, rank) if device == "cuda" else torch.device(device)
    for seed, case in enumerate(cases):
        counts, x, idx, weights, ws, grad = _data(case, world, seed)
        x, idx, weights, grad = (t.to(device) for t in (x, idx, weights, grad))
        ws = tuple(None if w is None else w.to(device) for w in ws)
        E_l = case.experts_per_rank
        E = E_l * world
        kw = dict(activation=case.activation)
        # float64 truth, and the single-process fp32 moe_mlp holding all experts
        ref, ref_grads = _forward_backward(partial(per_token_moe_mlp, **kw), x, idx, weights, ws, grad)
        one, one_grads = _forward_backward(partial(moe_mlp, **kw, impl=IMPL), x, idx, weights, ws, grad)

        lo, hi = sum(counts[:rank]), sum(counts[: rank + 1])
        mine = slice(rank * E_l, (rank + 1) * E_l)
        inputs = (x[lo:hi], idx[lo:hi], weights[lo:hi], tuple(None if w is None else w[mine] for w in ws))
        before = [t.clone() for t in (inputs[0], inputs[1], inputs[2])]
        ep = partial(expert_parallel_moe_mlp, group=None, num_experts=E, **kw, impl=IMPL)
        out, grads = _forward_backward(ep, *inputs, grad[lo:hi])
        assert all(torch.equal(a, b) for a, b in zip(before, inputs[:3])), case.name  # inputs not modified
        assert out.shape == (hi - lo, case.d) and out.dtype == torch.float32, case.name
        for want, want_grads in ((ref, ref_grads), (one, one_grads)):
            torch.testing.assert_close(
                out.double(), want[lo:hi].double(), **FP32, msg=lambda m, c=case: f"{c.name}: out: {m}"
            )
            expected = [want_grads[0][lo:hi], want_grads[1][lo:hi]] + [g[mine] for g in want_grads[2:]]
            for name, got, exp in zip(("x", "top_k_weights", "w1", "w2", "w3"), grads, expected):
                torch.testing.assert_close(got, exp, **FP32, msg=lambda m, c=case, n=name: f"{c.name}: d{n}: {m}")


@pytest.mark.parametrize("world", [1, 2, 4])  # 1: a single rank (E = 1 in the k = 1 case)
def test_matches_single_process(world):
    spawn(world, _check_cases, [c for c in CASES if c.fits(world)])


def _layer_vs_full(full, ep, rank: int, world: int, counts: list[int], seq: int | None = None) -> None:
    """``ep`` (an expert-parallel copy of ``full``) on this rank's tokens against ``full`` on all of them: outputs,
    input gradients, expert-shard gradients, router gradients (summed over ranks). ``seq``: inputs ``[B, seq, d]``
    with ``counts`` sequences per rank."""
    d = full.hidden_size
    shape = (sum(counts), seq, d) if seq else (sum(counts), d)
    x, grad = torch.randn(*shape), torch.randn(*shape)
    lo, hi = sum(counts[:rank]), sum(counts[: rank + 1])
    x_full = x.clone().requires_grad_()
    y_full, _ = full(x_full)
    (y_full * grad).sum().backward()
    x_ep = x[lo:hi].clone().requires_grad_()
    y_ep, _ = ep(x_ep)
    (y_ep * grad[lo:hi]).sum().backward()

    torch.testing.assert_close(y_ep, y_full[lo:hi], **FP32)
    torch.testing.assert_close(x_ep.grad, x_full.grad[lo:hi], **FP32)
    E_l = full.num_experts // world
    mine = slice(E_l * rank, E_l * (rank + 1))
    for name in ("w1", "w2", "w3"):
        torch.testing.assert_close(getattr(ep.experts, name).grad, getattr(full.experts, name).grad[mine], **FP32)
    # the replicated router sees only this rank's tokens: its gradients sum over the ranks
    router_grad = ep.router.weight.grad.clone()
    dist.all_reduce(router_grad)
    torch.testing.assert_close(router_grad, full.router.weight.grad, **FP32)


def _check_dmoe(rank: int, world: int) -> None:
    # the layer: expert_parallel(dMoE) loading its shard of a single-process dMoE's state dict
    from blocksparse_moe.layers.moe import dMoE

    torch.manual_seed(3)  # same full layer and data on every rank
    options = dict(top_k=2, activation="silu", glu=True, impl=IMPL, recompute_activation=True)
    full = dMoE(10, 7, 2 * world, **options)
    ep = expert_parallel(dMoE(10, 7, 2 * world, **options), dist.group.WORLD)
    assert ep.experts.w1.shape == (2, 10, 7) and ep.experts.num_experts == 2  # this rank's shard only
    ep.load_state_dict(shard_experts(full, dist.group.WORLD))
    _layer_vs_full(full, ep, rank, world, [3 + 2 * r for r in range(world)])  # uneven token counts, odd sizes
    # checkpoints are layout-independent: the gathered state dict is the single-process one
    gathered = gather_experts(ep, dist.group.WORLD)
    assert gathered.keys() == full.state_dict().keys()
    assert all(torch.equal(gathered[n], t) for n, t in full.state_dict().items())
    # meta-device construction: shard first, then materialise and load (no full-size expert weights allocated)
    with torch.device("meta"):
        lazy = expert_parallel(dMoE(10, 7, 2 * world, **options), dist.group.WORLD)
    lazy.to_empty(device="cpu")
    lazy.load_state_dict(shard_experts(full.state_dict(), dist.group.WORLD))
    x = torch.randn(4, 10)
    torch.testing.assert_close(lazy(x)[0], ep(x)[0])


def _check_padded(rank: int, world: int) -> None:
    # PaddedMoE under expert parallelism: capacity per rank (GShard's per-device groups): each rank's output equals
    # the single-device PaddedMoE run on that rank's tokens alone; tight capacity factors, so tokens really drop
    from blocksparse_moe.layers.moe import PaddedMoE
    from blocksparse_moe.strategies import padded_capacity, padded_slots

    E = 2 * world
    for options, seq in ((dict(capacity_factor=0.5), None), (dict(num_groups="sequence", capacity_factor=0.75), 5)):
        torch.manual_seed(4)  # the same layer on every rank
        full = PaddedMoE(8, 6, E, top_k=2, z_loss_weight=0.1, **options)
        ep = expert_parallel(PaddedMoE(8, 6, E, top_k=2, z_loss_weight=0.1, **options), dist.group.WORLD)
        ep.load_state_dict(shard_experts(full, dist.group.WORLD))
        T = 4 + 3 * rank  # uneven token (or sequence) counts per rank
        shape = (T, seq, 8) if seq else (T, 8)
        x, grad = torch.randn(*shape), torch.randn(*shape)
        # some assignments of this rank really are over capacity
        _, _, idx = full.router(x.reshape(-1, 8))
        G = T if seq else 1
        C = padded_capacity(idx.shape[0], 2, E, capacity_factor=options["capacity_factor"], num_groups=G)
        assert (padded_slots(idx, E, C, G) == G * E * C).any(), "the case must drop some assignments"

        x_full, x_ep = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_full, aux_full = full(x_full)
        y_ep, aux_ep = ep(x_ep)
        torch.testing.assert_close(y_ep, y_full, **FP32)
        torch.testing.assert_close(aux_ep, aux_full)
        ((y_full * grad).sum() + aux_full).backward()
        ((y_ep * grad).sum() + aux_ep).backward()
        torch.testing.assert_close(x_ep.grad, x_full.grad, **FP32)
        torch.testing.assert_close(ep.router.weight.grad, full.router.weight.grad, **FP32)
        for name in ("w1", "w2", "w3"):  # every rank's tokens reach this rank's experts: sum the full-layer grads
            g = getattr(full.experts, name).grad
            dist.all_reduce(g)
            torch.testing.assert_close(getattr(ep.experts, name).grad, g[2 * rank : 2 * rank + 2], **FP32)


def _check_bf16_combine(rank: int, world: int) -> None:
    # defect 13: one weight policy. bf16 tokens, fp32 router weights: the EP output equals the single-process
    # moe_mlp output. Each token picks one expert twice with weights 1 + 2^-10 and -1 (exact in fp32, 0 if the
    # weights were rounded to bf16 before the combine), plus a generic routing
    g = torch.Generator().manual_seed(5)
    E, T, d, f = 2 * world, 6, 8, 6
    ws = [(torch.randn(E, *shape, generator=g) / 3).bfloat16() for shape in ((d, f), (f, d), (d, f))]
    x = torch.randn(world * T, d, generator=g).bfloat16()
    one = torch.randint(0, E, (world * T, 1), generator=g)
    cancel = torch.tensor([[1 + 2**-10, -1.0]]).expand(world * T, 2)
    generic = routing(world * T, 2, E, "uniform", generator=g)
    mine = slice(2 * rank, 2 * rank + 2)
    lo, hi = rank * T, (rank + 1) * T
    for idx, weights in ((one.expand(-1, 2), cancel), (generic, torch.rand(world * T, 2, generator=g))):
        single = moe_mlp(x, idx, weights, *ws, activation="silu", impl=IMPL)
        ep = expert_parallel_moe_mlp(
            x[lo:hi],
            idx[lo:hi],
            weights[lo:hi],
            *(w[mine] for w in ws),
            group=None,
            num_experts=E,
            activation="silu",
            impl=IMPL,
        )
        assert ep.dtype == torch.bfloat16 and ep.abs().sum() > 0
        torch.testing.assert_close(ep, single[lo:hi], atol=0, rtol=0)


def _check_stages(rank: int, world: int) -> None:
    # the two stages alone: identity experts (y = tokens) give out[t] = Σ_j w[t, j] · x[t]
    g = torch.Generator().manual_seed(1)
    E, T, d = 2 * world, 5 + rank, 6
    x = torch.randn(T, d, generator=g)
    idx = routing(T, 3, E, "random", generator=g)
    weights = torch.rand(T, 3, generator=g)
    sent = ep_dispatch(x, idx, group=None, num_experts=E)
    total = torch.tensor([T * 3])
    dist.all_reduce(total)
    received = torch.tensor([sent.tokens.shape[0]])
    dist.all_reduce(received)
    assert received.item() == total.item()  # every assignment arrives exactly once
    assert sum(sent.send_splits) == T * 3 and sum(sent.recv_splits) == sent.tokens.shape[0]
    # rows arrive grouped by (source rank, local expert): the local ids follow recv_counts, and the counts are
    # every rank's assignments to this rank's two experts
    assert sent.recv_counts.shape == (world, 2)
    expected_ids = torch.arange(2).repeat(world).repeat_interleave(sent.recv_counts.flatten().long())
    assert torch.equal(sent.local_expert, expected_ids)
    hist = torch.bincount(idx.flatten(), minlength=E)
    dist.all_reduce(hist)
    assert torch.equal(sent.recv_counts.sum(0).long(), hist[2 * rank : 2 * rank + 2])
    assert sent.rows_per_expert == hist[2 * rank : 2 * rank + 2].tolist()
    out = ep_combine(sent.tokens, weights, sent)
    torch.testing.assert_close(out, weights.sum(1, keepdim=True) * x, **FP32)


def _check_shard_gather(rank: int, world: int) -> None:
    g = torch.Generator().manual_seed(2)
    E = 2 * world
    full = {
        "router.weight": torch.randn(E, 6, generator=g),  # replicated
        "experts.w1": torch.randn(E, 6, 5, generator=g),
        "experts.w2": torch.randn(E, 5, 6, generator=g),
        "experts.w3": torch.randn(E, 6, 5, generator=g),
    }
    shard = shard_experts(full, None)
    assert torch.equal(shard["router.weight"], full["router.weight"])
    for name in ("experts.w1", "experts.w2", "experts.w3"):
        assert torch.equal(shard[name], full[name][2 * rank : 2 * rank + 2])
    back = gather_experts(shard, None)
    assert list(back) == list(full)
    assert all(torch.equal(back[n], full[n]) for n in full)  # round trip is exact
    # a module works too (its state_dict), with custom expert-indexed names
    module = torch.nn.Module()
    module.bias_per_expert = torch.nn.Parameter(torch.randn(E, 3, generator=g))
    module.proj = torch.nn.Linear(3, 3)
    shard = shard_experts(module, None, expert_keys=("bias_per_expert",))
    assert shard["bias_per_expert"].shape == (2, 3) and shard["proj.weight"].shape == (3, 3)
    assert torch.equal(
        gather_experts(shard, None, expert_keys=("bias_per_expert",))["bias_per_expert"],
        module.bias_per_expert.detach(),
    )


def _check_errors(rank: int, world: int) -> None:
    x, idx, weights = torch.randn(4, 6), torch.randint(0, 4, (4, 2)), torch.rand(4, 2)
    w1, w2 = torch.randn(2, 6, 5), torch.randn(2, 5, 6)
    # E not divisible by the group size
    with pytest.raises(ValueError, match="divisible by the expert-parallel group size 2"):
        expert_parallel_moe_mlp(x, idx, weights, w1[:1], w2[:1], group=None, num_experts=3)
    # full weights instead of this rank's shard
    with pytest.raises(ValueError, match=r"w1 must be this rank's shard \(2, 6, 5\)"):
        expert_parallel_moe_mlp(x, idx, weights, torch.randn(4, 6, 5), w2, group=None, num_experts=4)
    with pytest.raises(ValueError, match="w3 must be this rank's shard"):
        expert_parallel_moe_mlp(x, idx, weights, w1, w2, torch.randn(2, 6, 4), group=None, num_experts=4)
    with pytest.raises(TypeError, match="w2 must be torch.float32"):
        expert_parallel_moe_mlp(x, idx, weights, w1, w2.double(), group=None, num_experts=4)
    with pytest.raises(ValueError, match=r"top_k_index must be \[4, k\]"):
        expert_parallel_moe_mlp(x, idx[:3], weights, w1, w2, group=None, num_experts=4)
    with pytest.raises(ValueError, match="top_k_weights must have shape"):
        expert_parallel_moe_mlp(x, idx, weights[:, :1], w1, w2, group=None, num_experts=4)
    with pytest.raises(ValueError, match="divisible by the group size 2"):
        shard_experts({"w1": torch.randn(3, 2, 2)}, None)
    # an expert id out of range fails on every rank (before any payload moves)
    with pytest.raises(ValueError, match=r"expert ids in \[0, 4\)"):
        expert_parallel_moe_mlp(x, idx + 4, weights, w1, w2, group=None, num_experts=4)
    with pytest.raises(ValueError, match="apply expert_parallel to a PaddedMoE"):
        expert_parallel_moe_mlp(x, idx, weights, w1, w2, group=None, num_experts=4, impl="padded")
    # the module style: divisible expert count, a MoE layer, applied once
    from blocksparse_moe.layers.moe import dMoE

    with pytest.raises(ValueError, match="divisible by the expert-parallel group size 2"):
        expert_parallel(dMoE(6, 4, 3, top_k=1), None)
    with pytest.raises(TypeError, match="needs a dMoE, a PaddedMoE or their MoEExperts"):
        expert_parallel(torch.nn.Linear(2, 2), None)
    layer = expert_parallel(dMoE(6, 4, 4), None)
    with pytest.raises(ValueError, match="already applied"):
        expert_parallel(layer.experts, None)
    with pytest.raises(ValueError, match="return_stats is not supported"):
        layer.experts(x, idx, weights, return_stats=True)
    # the group still works after the errors
    out = expert_parallel_moe_mlp(x, idx, weights, w1, w2, group=None, num_experts=4, impl=IMPL)
    assert out.shape == (4, 6)


def _check_two_rank_api(rank: int, world: int) -> None:
    for check in (_check_stages, _check_shard_gather, _check_dmoe, _check_padded, _check_bf16_combine, _check_errors):
        check(rank, world)


def test_stages_checkpoints_layers_and_errors():
    # one spawn for the smaller checks (process start-up dominates their cost): the stages, checkpoints,
    # expert_parallel on dMoE (also meta-initialised) and PaddedMoE, the bf16 combine policy, errors
    spawn(2, _check_two_rank_api)


def test_needs_initialized_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        expert_parallel_moe_mlp(
            torch.randn(2, 4),
            torch.zeros(2, 1, dtype=torch.long),
            torch.rand(2, 1),
            torch.randn(1, 4, 3),
            torch.randn(1, 3, 4),
            group=None,
            num_experts=1,
        )


@pytest.mark.gpu
@pytest.mark.parametrize("world", [1, 2])
def test_matches_single_process_nccl(world):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs, found {torch.cuda.device_count()}")
    spawn(world, _check_cases, [c for c in CASES if c.fits(world)], "cuda", backend="nccl")
