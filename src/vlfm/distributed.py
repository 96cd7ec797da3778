"""Process-group helpers for torchrun: start the group from torchrun's environment, and the few collectives the
contrastive losses need (gather with gradients, a ring shift whose gradient travels back the other way).

Everything works in a single process too: rank 0 of a world of 1, gathers return their input.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

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
        raise RuntimeError(f"cannot start torch.distributed: {', '.join(missing)} not set in the environment; "
                           "launch with `torchrun --nproc-per-node N ...`, which sets "
                           f"{', '.join(RENDEZVOUS_VARIABLES)}, LOCAL_RANK")
    device = torch.device("cpu")
    if torch.cuda.is_available() and backend in (None, "nccl"):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    return device


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
