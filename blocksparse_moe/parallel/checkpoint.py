"""Checkpoints through ``torch.distributed.checkpoint`` (DCP) that reload at any layout.

A model made parallel by ``parallelize_moe`` (or ``expert_parallel`` on a ``DeviceMesh``) holds DTensors with their
global shapes under the single-process parameter names, so ``get_state_dict`` / ``set_state_dict``
(``torch.distributed.checkpoint.state_dict``) and DCP's save / load reshard between layouts: a checkpoint saved at
``ep=2 × dp_shard=2`` loads at ``ep=4``, at ``dp_shard=4``, or into a model in one process (no process group), and
the other way round. ``save_checkpoint`` / ``load_checkpoint`` are those four calls. Collective when a process group
is initialised (every rank calls them); without one they run in the calling process alone.

Expert-parallel layers on a process group (plain shards) are not DCP-shardable: ``shard_experts`` /
``gather_experts`` convert their checkpoints.
"""

from __future__ import annotations

import os

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

__all__ = ["save_checkpoint", "load_checkpoint"]


def _states(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    model_state, optim_state = get_state_dict(model, [] if optimizer is None else optimizer)
    return {"model": model_state} if optimizer is None else {"model": model_state, "optim": optim_state}


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write ``model``'s (and ``optimizer``'s) state to the directory ``path`` with DCP, each rank its own shards."""
    dcp.save(_states(model, optimizer), checkpoint_id=path)


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Read the DCP checkpoint at ``path`` into ``model`` (and ``optimizer``; build it after the parallelisation),
    in place, whatever the layout it was saved at; every entry of the model (and optimizer) must be there."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path must be a DCP checkpoint directory, got {os.fspath(path)!r}")
    states = _states(model, optimizer)
    dcp.load(states, checkpoint_id=path)
    set_state_dict(
        model,
        [] if optimizer is None else optimizer,
        model_state_dict=states["model"],
        optim_state_dict=states.get("optim", {}),
    )
