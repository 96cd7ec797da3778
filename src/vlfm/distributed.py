"""Process-group helpers for torchrun: start the group from torchrun's environment, and the few collectives the
contrastive losses need (gather with gradients, a ring shift whose gradient travels back the other way).

Everything works in a single process too: rank 0 of a world of 1, gathers return their input.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from vlfm.io import UsageError

RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_env(backend: str | None = None, timeout: timedelta = timedelta(minutes=10)) -> torch.device:
    """Join the process group torchrun describes in the environment; returns this process's device.

    The timeout turns a peer that never arrives, or a collective that one rank skipped, into an error instead of
    a silent hang. NCCL when CUDA is available (one GPU per process, chosen by LOCAL_RANK), gloo otherwise."""
    missing = [name for name in RENDEZVOUS_VARIABLES if not os.environ.get(name)]
    if missing:
        raise UsageError(f"cannot start torch.distributed: {', '.join(missing)} not set in the environment; "
                         "launch with `torchrun --nproc-per-node N ...`, which sets "
                         f"{', '.join(RENDEZVOUS_VARIABLES)}, LOCAL_RANK")
    device = torch.device("cpu")
    if torch.cuda.is_available() and backend in (None, "nccl"):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    return device


@contextmanager
def group_if_launched(backend: str | None = None, timeout: timedelta = timedelta(minutes=10)) -> Iterator[None]:
    """Under torchrun (WORLD_SIZE set) with no group yet: join it for the block and leave it after; otherwise
    nothing (a single process, or a caller that joined already)."""
    joined = "WORLD_SIZE" in os.environ and not is_distributed()
    if joined:
        init_from_env(backend, timeout)
    try:
        yield
    finally:
        if joined:
            dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    if is_distributed():
        dist.barrier()


def local_batch_size(global_batch_size: int, world: int | None = None) -> int:
    """The rows each rank holds when a global batch is split evenly (the losses need equal shards)."""
    world = world_size() if world is None else world
    if global_batch_size % world:
        raise ValueError(f"a global batch of {global_batch_size} does not split over {world} processes; "
                         f"use a multiple of {world}")
    return global_batch_size // world


def check_equal_rows(rows: int, device: torch.device) -> None:
    """Fail on every rank, with the sizes, when ranks hold different numbers of rows: a gather of unequal shapes
    would otherwise hang or read garbage. One tiny collective."""
    sizes = all_gather(torch.tensor([rows], device=device)).tolist()
    if len(set(sizes)) > 1:
        raise ValueError(f"every process must hold the same number of rows; got {sizes} (by rank): "
                         "split the global batch evenly (vlfm.distributed.local_batch_size)")


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Rows of every rank, in rank order, without gradients (labels, keys)."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Rows of every rank, in rank order; the backward sums each rank's gradient for these rows back to them."""
    return tensor if world_size() == 1 else _GatherRows.apply(tensor)


class _GatherRows(torch.autograd.Function):
    """All-gather whose backward all-reduces and keeps this rank's rows. Ours rather than
    torch.distributed.nn.functional.all_gather, which torch 2.13 deprecates; all_reduce works on every backend
    (its traffic is twice a reduce-scatter's, small next to the model's gradients)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows = len(tensor)
        return all_gather(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce writes in place: never into autograd's
        dist.all_reduce(grad)
        return grad[rank() * ctx.rows : (rank() + 1) * ctx.rows]


class _RingShift(torch.autograd.Function):
    """Send to rank + 1 and receive from rank - 1; the gradient of what was received goes back to its sender."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return _exchange(tensor, forward=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _exchange(grad, forward=False)


def _exchange(tensor: torch.Tensor, forward: bool) -> torch.Tensor:
    me, world = rank(), world_size()
    send_to, receive_from = ((me + 1) % world, (me - 1) % world) if forward else ((me - 1) % world, (me + 1) % world)
    tensor = tensor.contiguous()
    received = torch.empty_like(tensor)
    # Batched so NCCL posts the send and the receive together (one after the other would deadlock the ring).
    operations = [dist.P2POp(dist.isend, tensor, send_to), dist.P2POp(dist.irecv, received, receive_from)]
    for request in dist.batch_isend_irecv(operations):
        request.wait()
    return received


def ring_shift(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor of rank - 1 (differentiable); after k shifts a rank holds the rows of rank - k."""
    return _RingShift.apply(tensor)


# --- model wrapping and full-state checkpoints -----------------------------------------------------------------
def wrap_model(model: torch.nn.Module, strategy: str | None, precision: str = "fp32") -> torch.nn.Module:
    """The module a training step runs: DDP around the model, or the model sharded in place with FSDP2 (each
    transformer block, then the root), or the model itself in a single process (strategy None)."""
    if strategy is None:
        return model
    device = next(model.parameters()).device
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else MixedPrecisionPolicy()
    for module in model.modules():
        if hasattr(module, "blocks") and isinstance(module.blocks, torch.nn.ModuleList):
            for block in module.blocks:
                fully_shard(block, mp_policy=policy)
    # FSDP2 shards no scalar (the logit scale and bias): they stay whole on every rank (average_replicated_gradients)
    fully_shard(model, mp_policy=policy, ignored_params={p for p in model.parameters() if p.dim() == 0})
    for method in ("encode_image", "encode_text"):  # evaluation calls these, not forward: they must gather too
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    return model


class _FullState:
    """A model or optimizer whose state_dict() is the gathered full one: checkpoint.py writes it unchanged."""

    def __init__(self, owner, state: dict):
        self._owner, self._state = owner, state

    def __getattr__(self, name):
        return getattr(self._owner, name)

    def state_dict(self) -> dict:
        return self._state

    def write_files(self, directory, state=None):
        self._owner.write_files(directory, self._state)

    def save(self, path, state=None):
        return self._owner.save(path, self._state)


def _parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order: a full optimizer state is keyed by name, a checkpoint by index."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, sharded: bool):
    """(model, optimizer) as checkpoint.py saves them. Sharded: every rank must call (a collective); rank 0 gets
    the full state on the CPU, in the single-process layout, so any world size (or one process) resumes it."""
    if not sharded:
        return model, optimizer
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    if optimizer is None:
        return _FullState(model, model_state), None
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    index = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
    indexed = {"state": {index[name]: value for name, value in optimizer_state.get("state", {}).items()},
               "param_groups": [dict(g, params=[index[name] for name in g["params"]])
                                for g in optimizer_state.get("param_groups", [])]}
    return _FullState(model, model_state), _FullState(optimizer, indexed)


def load_sharded_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           groups: list[dict]) -> None:
    """Load a checkpoint's optimizer (tensors named `INDEX.NAME`, param groups holding indices) into the
    optimizer of a sharded model; each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _parameter_names(model, optimizer)
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(names[int(index)], {})[name] = value
    groups = [dict(g, params=[names[i] for i in g["params"]], betas=tuple(g["betas"])) for g in groups]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))


def average_gradients(module: torch.nn.Module, replicated_only: bool = False) -> None:
    """DDP's gradient averaging, for a step whose backward ran outside DDP's forward (GradCache); replicated_only:
    only the parameters FSDP left whole (plain tensors among its sharded DTensors)."""
    from torch.distributed.tensor import DTensor

    for param in module.parameters():
        if param.grad is not None and not (replicated_only and isinstance(param, DTensor)):
            dist.all_reduce(param.grad)
            param.grad /= world_size()
