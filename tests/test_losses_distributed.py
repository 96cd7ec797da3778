"""The distributed losses on 3 gloo processes (3, so that a ring turning the wrong way shows) equal one process
on the global batch.

One spawn runs every variant (process start-up dominates the time); each rank saves its losses and gradients,
and the tests compare them the way DDP combines ranks: the mean of the losses, the mean of the logit scale/bias
gradients, and each rank's feature gradients divided by the world size (DDP averages what they feed into).
"""

import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

from vlfm import distributed
from vlfm.io import UsageError
from vlfm.losses import clip_loss, clip_loss_distributed, siglip_loss, siglip_loss_distributed

WORLD, ROWS, DIM = 3, 3, 6
KEYS = torch.tensor([0, 1, 0, 2, 3, 1, 0, 4, 2])  # repeats inside a rank and across ranks

VARIANTS = {
    "clip_gather": lambda image, text, scale, bias, keys: clip_loss_distributed(image, text, scale, keys),
    "clip_gather_chunked": lambda image, text, scale, bias, keys: clip_loss_distributed(image, text, scale, keys,
                                                                                        chunk_size=3),
    "clip_local_loss": lambda image, text, scale, bias, keys: clip_loss_distributed(image, text, scale, keys,
                                                                                    local_loss=True),
    "siglip_ring": lambda image, text, scale, bias, keys: siglip_loss_distributed(image, text, scale, bias, keys),
}


def global_batch():
    generator = torch.Generator().manual_seed(0)
    image, text = (torch.randn(WORLD * ROWS, DIM, generator=generator, dtype=torch.float64) for _ in range(2))
    scale, bias = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    return image / image.norm(dim=1, keepdim=True), text / text.norm(dim=1, keepdim=True), scale, bias


def loss_and_grads(loss_fn, image, text, scale, bias, keys):
    leaves = [x.clone().requires_grad_() for x in (image, text, scale, bias)]
    loss = loss_fn(*leaves, keys)
    loss.backward()
    grads = [torch.zeros_like(x) if x.grad is None else x.grad for x in leaves]  # CLIP has no bias
    return {"loss": loss.detach(), "image": grads[0], "text": grads[1], "scale": grads[2], "bias": grads[3]}


def reference(variant, keys):
    single = clip_loss if variant.startswith("clip") else siglip_loss
    loss_fn = (lambda i, t, s, b, k: single(i, t, s, keys=k)) if single is clip_loss else (
        lambda i, t, s, b, k: single(i, t, s, b, keys=k))
    return loss_and_grads(loss_fn, *global_batch(), keys)


def worker(rank, port, directory):
    import os

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    distributed.init_from_env(backend="gloo", timeout=timedelta(seconds=30))
    image, text, scale, bias = global_batch()
    mine = slice(rank * ROWS, (rank + 1) * ROWS)
    results = {}
    for name, loss_fn in VARIANTS.items():
        for with_keys in (False, True):
            keys = KEYS[mine] if with_keys else None
            results[name, with_keys] = loss_and_grads(loss_fn, image[mine], text[mine], scale, bias, keys)
    uneven = ROWS - rank  # ranks hold 3, 2, 1 rows
    for name in ("clip_gather", "siglip_ring"):
        try:
            VARIANTS[name](image[:uneven], text[:uneven], scale, bias, None)
        except ValueError as error:
            results[name, "uneven"] = str(error)
    torch.save(results, f"{directory}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ranks")
    context = mp.start_processes(worker, args=(free_port(), str(directory)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD}-process run did not finish in 120 s")
    return [torch.load(directory / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("with_keys", [False, True], ids=["diagonal", "keys"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_distributed_loss_equals_one_process(ranks, variant, with_keys):
    expected = reference(variant, KEYS if with_keys else None)
    got = [r[variant, with_keys] for r in ranks]
    assert torch.stack([g["loss"] for g in got]).mean().item() == pytest.approx(expected["loss"].item(), abs=1e-6)
    for name in ("image", "text"):
        averaged = torch.cat([g[name] for g in got]) / WORLD
        assert torch.allclose(averaged, expected[name], atol=1e-6, rtol=0), name
    for name in ("scale", "bias"):
        averaged = torch.stack([g[name] for g in got]).mean()
        assert averaged.item() == pytest.approx(expected[name].item(), abs=1e-6), name
    assert expected["image"].abs().sum() > 0 and expected["scale"] != 0


def test_keys_change_the_distributed_loss(ranks):
    # the repeated keys cross ranks, so a wrong gather of keys would show here
    for variant in VARIANTS:
        assert ranks[0][variant, True]["loss"] != pytest.approx(ranks[0][variant, False]["loss"].item())


@pytest.mark.parametrize("variant", ["clip_gather", "siglip_ring"])
def test_uneven_rows_fail_on_every_rank(ranks, variant):
    for r in ranks:
        assert "[3, 2, 1]" in r[variant, "uneven"] and "same number of rows" in r[variant, "uneven"]


def test_without_process_group_the_distributed_losses_are_the_single_ones():
    image, text, scale, bias = global_batch()
    for variant, loss_fn in VARIANTS.items():
        single = reference(variant, KEYS)["loss"]
        assert loss_fn(image, text, scale, bias, KEYS).item() == pytest.approx(single.item(), abs=1e-12), variant


def test_local_loss_is_not_chunked():
    image, text, scale, _ = global_batch()
    with pytest.raises(ValueError, match="chunk_size applies to the global loss"):
        clip_loss_distributed(image, text, scale, local_loss=True, chunk_size=4)


def test_global_batch_must_split_evenly():
    assert distributed.local_batch_size(12, 4) == 3
    with pytest.raises(ValueError, match="global batch of 10 does not split over 4 processes"):
        distributed.local_batch_size(10, 4)


def test_init_without_torchrun_env_names_the_variables(monkeypatch):
    for name in distributed.RENDEZVOUS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UsageError, match="MASTER_ADDR, MASTER_PORT, WORLD_SIZE not set.*torchrun --nproc-per-node"):
        distributed.init_from_env(backend="gloo")
