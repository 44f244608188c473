"""Expert parallelism on a DeviceMesh composed with FSDP2 (``parallelize_moe``), on 4 gloo processes on CPU,
against one process holding the whole model and the whole batch: several AdamW steps, comparing the outputs, the
losses and every parameter after the steps (router included).

Each test is one ``torch.multiprocessing.spawn`` running a list of cases, so that process start-up (importing
torch) is paid once. Workers run the ``torch`` backend of ``moe_mlp`` (the kernels have their own tests).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist
from multiprocess import spawn
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor, Shard

from blocksparse_moe.layers.moe import PaddedMoE, dMoE
from blocksparse_moe.parallel import expert_parallel, parallelize_moe
from blocksparse_moe.parallel.checkpoint import load_checkpoint, save_checkpoint

WORLD = 4
FP32 = dict(atol=1e-4, rtol=1e-4)  # as test_expert_parallel; Adam's steps amplify summation-order noise
BF16 = dict(atol=5e-3, rtol=2e-2)


class Tiny(nn.Module):
    """A residual block around one MoE layer: the smallest model with non-expert parameters on both sides."""

    def __init__(self, layer: nn.Module, d: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.moe = layer
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.inp(x))
        y, aux = self.moe(h)
        return self.out(h + y), aux


@dataclass(frozen=True)
class Case:
    name: str  # the edge the case covers
    mesh: tuple[int, int]  # (dp_shard, ep)
    tokens: tuple[int, ...] = (6, 6, 6, 6)  # tokens per rank
    layer: str = "dmoe"  # dmoe | padded
    num_experts: int = 4
    layer_kw: dict = field(default_factory=dict)
    bf16: bool = False  # bf16 parameters, fp32 gradient reduction (MixedPrecisionPolicy)
    capacity_per_rank: int | None = None  # the sync-free mode's bound
    num_chunks: int = 1  # pipelined token chunks
    steps: int = 3


D, F = 8, 6

CASES = [
    Case("EP × FSDP2 on a 2×2 mesh, GLU, shared expert, z-loss", (2, 2), layer_kw=dict(shared_expert_size=5)),
    Case("EP alone over 4 ranks (dp_shard = 1), one expert per rank, k = E", (1, 4), layer_kw=dict(top_k=4)),
    Case("FSDP2 alone (ep = 1), no GLU, k = 1", (4, 1), layer_kw=dict(glu=False, top_k=1, activation="gelu")),
    Case("2×2, two ranks with no tokens and one with one token", (2, 2), tokens=(0, 7, 0, 1), num_experts=8),
    Case("2×2, bf16 parameters with fp32 gradient reduction", (2, 2), bf16=True),
    Case("PaddedMoE under EP × FSDP2 (tight capacity: tokens drop)", (2, 2), layer="padded"),
    Case("2×2, the sync-free exchange within its bound", (2, 2), capacity_per_rank=12),
    Case("2×2, 4 pipelined chunks, PaddedMoE (capacity over the rank's tokens)", (2, 2), layer="padded", num_chunks=4),
    Case("2×2, 3 chunks, sync-free: chunks of 0 and 1 tokens", (2, 2), (0, 7, 0, 1), num_chunks=3, capacity_per_rank=6),
    # the balance loss's expert fractions over every rank's tokens (parallelize_moe's balance_group), as in one process
    Case("2×2, load-balancing loss over the global batch", (2, 2), layer_kw=dict(load_balancing_weight=0.05)),
]


def _layer(case: Case, num_groups: int) -> nn.Module:
    kw = dict(top_k=2, load_balancing_weight=0.0, z_loss_weight=0.01 if len(set(case.tokens)) == 1 else 0.0)
    kw.update(case.layer_kw)
    if case.layer == "padded":  # per-rank capacity = GShard groups of one rank's tokens
        return PaddedMoE(D, F, case.num_experts, capacity_factor=0.75, num_groups=num_groups, **kw)
    return dMoE(D, F, case.num_experts, **kw)


def _model(case: Case, num_groups: int = 1, seed: int = 0) -> nn.Module:
    """The model, the same on every rank (seeded); ``num_groups``: PaddedMoE's capacity groups."""
    torch.manual_seed(seed)
    return Tiny(_layer(case, num_groups), D)


def _loss(out: torch.Tensor, target: torch.Tensor, aux: torch.Tensor, total: int, world: int) -> torch.Tensor:
    """This rank's share of the global mean squared error (its sum over the global count, times W: FSDP averages
    the gradients over the W ranks), plus the auxiliary loss (a per-rank mean: equal batches only)."""
    return ((out - target) ** 2).sum() / (total * out.shape[1]) * world + aux


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _check_case(rank: int, world: int, case: Case) -> None:
    msg = case.name
    mesh = init_device_mesh("cpu", case.mesh, mesh_dim_names=("dp_shard", "ep"))
    # the single-process model; PaddedMoE: one capacity group per rank's tokens, as under expert parallelism
    # (GShard's per-device groups)
    ref = _model(case, num_groups=world)
    ref_bf16 = _model(case, num_groups=world).bfloat16()
    model = _model(case)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if case.bf16 else None
    parallelize_moe(model, mesh, mp_policy=policy, capacity_per_rank=case.capacity_per_rank, num_chunks=case.num_chunks)
    assert isinstance(model.moe.experts.w1, DTensor) and isinstance(model.inp.weight, DTensor), msg
    assert model.moe.experts.w1.shape == (case.num_experts, D, F), msg  # global shape
    # bf16: Adam's eps 1e-8 turns bf16 noise in a near-zero gradient element into a full step of either sign; a
    # larger eps keeps the update proportional to the gradient there, so that parameters can be compared
    adam = dict(lr=1e-2, eps=1e-2 if case.bf16 else 1e-8)
    opt_ref = torch.optim.AdamW(ref.parameters(), **adam)
    opt = torch.optim.AdamW(model.parameters(), **adam)

    g = torch.Generator().manual_seed(1)
    counts = list(case.tokens)
    total = sum(counts)
    lo, hi = sum(counts[:rank]), sum(counts[: rank + 1])
    tol = BF16 if case.bf16 else FP32
    for step in range(case.steps):
        x, target = torch.randn(total, D, generator=g), torch.randn(total, D, generator=g)
        if case.bf16:  # FSDP's mixed precision in one process: a bf16 copy computes, the fp32 master steps
            with torch.no_grad():
                for low, master in zip(ref_bf16.parameters(), ref.parameters()):
                    low.copy_(master)
            out_ref, aux_ref = ref_bf16(x.bfloat16())
        else:
            out_ref, aux_ref = ref(x)
        loss_ref = _loss(out_ref.float(), target, aux_ref.float(), total, 1)
        loss_ref.backward()
        if case.bf16:
            for low, master in zip(ref_bf16.parameters(), ref.parameters()):
                master.grad, low.grad = low.grad.float(), None

        out, aux = model(x[lo:hi])
        loss = _loss(out.float(), target[lo:hi], aux.float(), total, world)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        for name, p in ref.named_parameters():  # the gradients of the global mean loss (Adam would hide a scale)
            torch.testing.assert_close(
                _full(grads[name]).float(), p.grad, **tol, msg=lambda m, n=name, s=step: f"{msg}: d{n}, step {s}: {m}"
            )
        opt.step()
        opt.zero_grad()
        opt_ref.step()
        opt_ref.zero_grad()

        torch.testing.assert_close(
            out.float(), out_ref[lo:hi].float(), **tol, msg=lambda m, s=step: f"{msg}: step {s}: {m}"
        )
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        torch.testing.assert_close(
            global_loss / world, loss_ref.detach(), **tol, msg=lambda m, s=step: f"{msg}: loss, step {s}: {m}"
        )
    params = dict(model.named_parameters())
    worst = 0.0
    for name, want in ref.named_parameters():
        got = _full(params[name].detach())
        torch.testing.assert_close(got.float(), want.detach().float(), **tol, msg=lambda m, n=name: f"{msg}: {n}: {m}")
        worst = max(worst, (got.float() - want.detach()).abs().max().item())
    if rank == 0:  # the measured difference, for the record (pytest -s shows it)
        print(f"{msg}: largest parameter difference after {case.steps} AdamW steps: {worst:.2e}")


def _check_api(rank: int, world: int) -> None:
    # expert_parallel on a 1-D mesh: DTensor Shard(0) weights of the global shape holding this rank's experts
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    torch.manual_seed(0)
    full = dMoE(D, F, 2 * world)
    layer = expert_parallel(copy.deepcopy(full), mesh)
    for name in ("w1", "w2", "w3"):
        w = getattr(layer.experts, name)
        assert isinstance(w, torch.nn.Parameter) and isinstance(w, DTensor) and w.placements == (Shard(0),), name
        assert w.shape == getattr(full.experts, name).shape, name
        assert torch.equal(w.to_local(), getattr(full.experts, name)[2 * rank : 2 * rank + 2]), name
    x = torch.randn(3 + rank, D)  # uneven token counts
    torch.testing.assert_close(layer(x)[0], full(x)[0], **FP32)
    # built on the meta device, made parallel, materialised: the shard alone is allocated
    with torch.device("meta"):
        lazy = expert_parallel(dMoE(D, F, 2 * world), mesh)
    lazy.to_empty(device="cpu")
    assert lazy.experts.w1.to_local().shape == (2, D, F) and lazy.experts.w1.to_local().device.type == "cpu"

    # errors, each naming what was expected and what came
    with pytest.raises(ValueError, match="divisible by the expert-parallel group size 4, got 6"):
        expert_parallel(dMoE(D, F, 6), mesh)  # uneven expert counts are rejected
    grid = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "ep"))
    with pytest.raises(ValueError, match=r"1-D DeviceMesh \(e.g. mesh\['ep'\]\), got 2 dimensions"):
        expert_parallel(dMoE(D, F, 4), grid)
    with pytest.raises(TypeError, match="mesh must be a 1-D DeviceMesh, a ProcessGroup or None, got str"):
        expert_parallel(dMoE(D, F, 4), "ep")
    with pytest.raises(ValueError, match=r"dimensions named \('dp_shard', 'ep'\), got \('ep',\)"):
        parallelize_moe(Tiny(dMoE(D, F, 4), D), mesh)
    with pytest.raises(TypeError, match="mesh must be a DeviceMesh, got ProcessGroup"):
        parallelize_moe(Tiny(dMoE(D, F, 4), D), dist.group.WORLD)
    with pytest.raises(ValueError, match="holds no dMoE or PaddedMoE to parallelise"):
        parallelize_moe(nn.Linear(D, D), grid)
    with pytest.raises(TypeError, match="mp_policy must be a MixedPrecisionPolicy or None, got dict"):
        parallelize_moe(Tiny(dMoE(D, F, 4), D), grid, mp_policy={})
    # a model whose root is the MoE layer itself
    torch.manual_seed(0)
    alone = parallelize_moe(dMoE(D, F, 4), grid)
    assert isinstance(alone.router.weight, DTensor) and alone(torch.randn(2, D))[0].shape == (2, D)


def _check_cases(rank: int, world: int, cases: list[Case]) -> None:
    _check_api(rank, world)
    for case in cases:
        _check_case(rank, world, case)


def test_parallelize_moe_matches_single_process():
    # one spawn: the API and error checks, then every case of CASES
    spawn(WORLD, _check_cases, CASES)


# ----------------------------------------------------------------------------------------------- DCP checkpoints

LAYOUTS = ((1, 4), (4, 1))  # (dp_shard, ep) a checkpoint saved at 2×2 is loaded at: ep = 4, and ep = 1 × dp = 4


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor) -> None:
    out, aux = model(x)
    (((out - target) ** 2).mean() + aux).backward()
    opt.step()
    opt.zero_grad()


def _full_states(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Every parameter and every optimizer state tensor, gathered to full tensors (collective)."""
    model_state, optim_state = get_state_dict(model, opt)
    params = {name: _full(t).clone() for name, t in model_state.items()}
    optim = {(name, key): _full(t).clone() for name, state in optim_state["state"].items() for key, t in state.items()}
    return params, optim


def _check_dcp(rank: int, world: int, path: str) -> None:
    case = Case("checkpoint", (2, 2))
    g = torch.Generator().manual_seed(rank)  # each rank its own batch
    batches = [(torch.randn(4, D, generator=g), torch.randn(4, D, generator=g)) for _ in range(3)]
    model = parallelize_moe(_model(case), init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "ep")))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for x, target in batches[:2]:
        _train_step(model, opt, x, target)
    save_checkpoint(f"{path}/ckpt", model, opt)
    params, optim = _full_states(model, opt)
    if rank == 0:  # what the single-process load must find
        torch.save(params, f"{path}/full.pt")
    _train_step(model, opt, *batches[2])
    after, _ = _full_states(model, opt)

    for layout in LAYOUTS:
        mesh = init_device_mesh("cpu", layout, mesh_dim_names=("dp_shard", "ep"))
        fresh = parallelize_moe(_model(case, seed=1), mesh)  # other weights: the load must overwrite them
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        load_checkpoint(f"{path}/ckpt", fresh, fresh_opt)
        got, got_optim = _full_states(fresh, fresh_opt)
        assert got.keys() == params.keys() and got_optim.keys() == optim.keys(), layout
        for name, want in params.items():
            assert torch.equal(got[name], want), (layout, name)
        for name, want in optim.items():
            assert torch.equal(got_optim[name], want), (layout, name)
        # and the resumed run continues the same curve: the next step equals the uninterrupted one's
        _train_step(fresh, fresh_opt, *batches[2])
        for name, want in _full_states(fresh, fresh_opt)[0].items():
            torch.testing.assert_close(want, after[name], **FP32, msg=lambda m, n=name, lay=layout: f"{lay} {n}: {m}")


def test_dcp_checkpoint_reloads_at_other_layouts(tmp_path):
    # saved at ep=2 × dp_shard=2 (weights and AdamW state), loaded at ep=4, at ep=1 × dp_shard=4, and in this
    # process without any process group, with equal weights
    spawn(WORLD, _check_dcp, str(tmp_path))
    case = Case("checkpoint", (2, 2))
    model = _model(case, seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    load_checkpoint(tmp_path / "ckpt", model, opt)
    full = torch.load(tmp_path / "full.pt")
    state = model.state_dict()
    assert state.keys() == full.keys()
    for name, want in full.items():
        assert torch.equal(state[name], want), name
    assert all(s["step"].item() == 2 for s in opt.state.values()) and len(opt.state) == len(full)
    with pytest.raises(FileNotFoundError, match="DCP checkpoint directory"):
        load_checkpoint(tmp_path / "missing", model)
