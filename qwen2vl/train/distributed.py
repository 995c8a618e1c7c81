"""torch.distributed around the model, from outside (the model knows nothing of it): each process's device, the
process group from torchrun's environment (gloo on the CPU, nccl between GPUs, one GPU a process), DDP or FSDP2
(``fully_shard`` on the ViT, every decoder layer, then the root), and the few collective helpers the loop needs.
A single process needs none of it but the device."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import save_checkpoint


def pick_device(name: str | None) -> torch.device:
    """The device this process trains on. None: its own GPU (``cuda:LOCAL_RANK`` under torchrun) if torch sees
    one, else the CPU. A bare "cuda" also means the process's own GPU."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be like 'cpu', 'cuda' or 'cuda:1', got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for, but torch sees no GPU here")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)  # nccl and the caching allocator use the current device
    return device


def init(device: torch.device | None = None) -> tuple[int, int]:
    """(rank, world size); starts the process group when torchrun launched more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device is not None and device.type == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def wrap(objective: nn.Module, kind: str, world: int) -> nn.Module:
    if world == 1:
        return objective
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(objective)
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        model = objective.model
        # The ViT is one unit kept gathered through the forward: a row may call it twice (images, then videos)
        # or, with no media, once on a dummy (Objective), and every rank must gather in the same order.
        fully_shard(model.visual, reshard_after_forward=False)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(objective)
        return objective
    raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {kind!r}")


def inner(objective: nn.Module):
    """The Qwen2VL inside the (possibly wrapped) objective."""
    return getattr(objective, "module", objective).model


def no_sync(objective: nn.Module, last: bool):
    """DDP: synchronise gradients only on the window's last backward."""
    if not last and hasattr(objective, "no_sync"):
        return objective.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(objective: nn.Module, max_norm: float) -> torch.Tensor:
    params = [p for p in objective.parameters() if p.grad is not None]  # none at all: a norm of 0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sharded(model: nn.Module) -> bool:
    return dist.is_initialized() and any(hasattr(p, "full_tensor") for p in model.parameters())


def save(objective: nn.Module, optimizer, out: Path, step: int, state: dict, rank: int) -> None:
    """Rank 0 writes the checkpoint; under FSDP2 the full model and optimizer states are gathered first, so the
    checkpoint is the same whatever the number of processes."""
    model = inner(objective)
    if sharded(model):
        from torch.distributed.checkpoint import state_dict as dsd

        options = dsd.StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = dsd.get_model_state_dict(model, options=options)
        optimizer_state = dsd.get_optimizer_state_dict(model, optimizer, options=options)
        if rank == 0:
            model = type(model)(model.config)
            model.load_state_dict(full)
    else:
        optimizer_state = optimizer.state_dict()
    if rank == 0:
        save_checkpoint(out, step, model, optimizer_state, state)
    barrier()


def load_optimizer(objective: nn.Module, optimizer, saved: dict) -> None:
    model = inner(objective)
    if sharded(model):
        from torch.distributed.checkpoint import state_dict as dsd

        dsd.set_optimizer_state_dict(model, optimizer, saved, options=dsd.StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(saved)
