"""The floors a round is measured against: compute (the app's own ``train_local``, no
Flower) and copy (a round's messages moved as plain copies of the weights).

Why: everything in a round above these floors is the Flower path's overhead.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch

from benchmarks.round.runs import _resources, workers_of
from clients.training import train_local
from flower_app.config import RunConfig
from flower_app.data.preprocessing import batch_preprocessor
from flower_app.models.factory import build_model
from flower_app.perf.allocator import keep_freed_memory
from flower_app.runs.runtime import use_bf16


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Floor:
    """Best training rate of the tight loop, and the bare client work of one round."""

    rates: dict[str, float]  # "batch 64" / "batch 256 compiled" -> images/s of one process
    best: str
    images: int
    parallel: int  # processes that add up: client workers on a CPU, 1 on a GPU (time slicing)
    bare_round_s: float  # clients x J steps of batch B, shared by ``parallel`` processes
    copy_floor_s: float = math.nan  # ``copies`` copies of the weights, one thread
    model_mb: float = math.nan  # the model's weights
    copies: int = 0  # 2 x clients of a round: every message down and up

    @property
    def seconds(self) -> float:
        return self.images / (self.rates[self.best] * self.parallel)


def _timed_train(
    model: torch.nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    batch: int,
    cfg: RunConfig,
    device: torch.device,
    seed: int,
) -> float:
    """Seconds of ``steps`` steps of the app's ``train_local`` with a fresh optimizer."""
    images, labels = data
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        foreach=True,
    )
    batches = torch.Generator().manual_seed(seed)
    augment = torch.Generator(device=device).manual_seed(seed)
    synchronize(device)
    start = time.perf_counter()
    train_local(
        model,
        optimizer,
        images,
        labels,
        torch.arange(len(labels)),
        steps,
        batch,
        batch_preprocessor(cfg.image_size),
        batches,
        augment,
        use_bf16(cfg.precision, device),
    )
    synchronize(device)
    return time.perf_counter() - start


def measure_floor(
    cfg: RunConfig,
    device: torch.device,
    batch_sizes: list[int],
    compile_floor: bool,
    threads: int,
    parallel: int,
) -> Floor:
    """The tight loop: same model, data path, precision and allocator settings as a client
    (``keep_freed_memory``), no Flower.

    On a CPU it runs with the threads of one client worker (Ray gives each worker
    ``client-resources-num-cpus`` threads) and counts ``parallel`` workers as adding
    up, since each has its own cores; on a GPU workers take turns, so ``parallel`` is 1.
    """
    keep_freed_memory()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _measure_floor(cfg, device, batch_sizes, compile_floor, parallel)
    finally:
        torch.set_num_threads(previous_threads)


def _measure_floor(
    cfg: RunConfig, device: torch.device, batch_sizes: list[int], compile_floor: bool, parallel: int
) -> Floor:
    images_per_round = cfg.clients_per_round * cfg.local_steps * cfg.batch_size
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.num_classes, cfg.image_size).to(device)
    g = torch.Generator().manual_seed(0)
    pool = max([*batch_sizes, cfg.batch_size]) * 2
    data = (
        torch.randint(0, 256, (pool, 3, 32, 32), dtype=torch.uint8, generator=g).to(device),
        torch.randint(0, cfg.num_classes, (pool,), generator=g).to(device),
    )
    rates: dict[str, float] = {}

    def rate(step_model: torch.nn.Module, batch: int) -> float:
        _timed_train(step_model, data, 3, batch, cfg, device, 1)  # warm-up (and compile)
        steps = max(2, math.ceil(images_per_round / batch))
        return steps * batch / _timed_train(step_model, data, steps, batch, cfg, device, 2)

    for batch in batch_sizes:
        rates[f"batch {batch}"] = rate(model, batch)
    if compile_floor:
        batch = max(batch_sizes, key=lambda b: rates[f"batch {b}"])
        rates[f"batch {batch} compiled"] = rate(torch.compile(model), batch)
    bare = sum(
        _timed_train(model, data, cfg.local_steps, cfg.batch_size, cfg, device, 10 + client)
        for client in range(cfg.clients_per_round)
    )
    best = max(rates, key=lambda k: rates[k])
    return Floor(rates, best, images_per_round, parallel, bare / parallel)


def measure_copy_floor(cfg: RunConfig, copies: int, repeats: int = 5) -> tuple[float, float]:
    """(seconds, MiB): ``copies`` copies of the model's weights into preallocated, touched
    buffers, best of ``repeats``, one thread: a round's messages moved as plain copies."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        state = build_model(cfg.model, cfg.num_classes, cfg.image_size).state_dict()
        sources = [t.detach().contiguous() for t in state.values()]
        targets = [torch.zeros_like(t) for t in sources]
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(copies):
                for target, source in zip(targets, sources, strict=True):
                    target.copy_(source)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous_threads)
    return best, sum(t.numel() * t.element_size() for t in sources) / 2**20


def floor_of_round(
    cfg: RunConfig,
    device: torch.device,
    federation: str,
    compile_floor: bool,
    batch_sizes: list[int],
) -> Floor:
    """Measure the compute floor with one client worker's threads and the copy floor of a
    round's messages, and print them."""
    workers = workers_of(federation, cfg.clients_per_round)
    threads = max(1, int(float(_resources(federation).get("client-resources-num-cpus", 2))))
    parallel = workers if device.type == "cpu" else 1
    floor = measure_floor(cfg, device, batch_sizes, compile_floor, threads, parallel)
    copies = 2 * cfg.clients_per_round
    copy_s, model_mb = measure_copy_floor(cfg, copies)
    floor = dataclasses.replace(floor, copy_floor_s=copy_s, model_mb=model_mb, copies=copies)
    print(
        f"copy floor: {copies} copies of the weights ({model_mb:.1f} MiB) into preallocated "
        f"buffers, one thread, best of 5: {copy_s:.4g} s",
        flush=True,
    )
    rates = ", ".join(f"{k} {v:.0f}" for k, v in floor.rates.items())
    print(f"compute floor, one process with {threads} thread(s) (img/s): {rates}", flush=True)
    print(
        f"floor of a round: {floor.images} images in {floor.seconds:.3f} s ({floor.best}, "
        f"x{parallel} process(es)); bare client compute ({cfg.clients_per_round} clients x "
        f"{cfg.local_steps} steps x {cfg.batch_size}, shared by {parallel}): "
        f"{floor.bare_round_s:.3f} s",
        flush=True,
    )
    return floor
