"""Message path benchmark: what carrying ViT-S/16 weights through Flower costs, step by step.

Why this exists: every round moves the ViT-S/16 weights (timm ``vit_small_patch16_224``,
100 classes, 32 px: about 87 MB of float32 in ~152 tensors) through Flower 20 times
(10 messages down, 10 back). This script times each step of that path for one
ArrayRecord, next to the app's by-reference path (a safetensors file in ``/dev/shm``) and
next to the cheapest possible move, one plain copy into preallocated, already-touched
buffers, which is the unit ("x copy") of the table.

Steps (best and median of N repetitions after one warm-up, torch on one thread):

1. copy: ``Tensor.copy_`` of every tensor into zero-filled tensors (the unit).
2. encode: ``ArrayRecord(state_dict)`` (numpy + ``np.save`` per tensor).
3. Deployment Engine: the object ids and bytes that pushing a Message computes, as
   ``GrpcGrid.push_messages`` / ``push_message`` do, inside ``no_object_id_recompute()``:
   ``Message.object_id`` + ``get_object_tree`` + ``get_all_nested_objects`` (sha256 of
   every ArrayChunk, Array, record and the message), then ``deflate()`` of every nested
   object (the bytes ``push_objects`` sends), and on the receiving side
   ``inflate_object_from_contents`` of the ArrayRecord. ``hashlib.sha256`` over the same
   bytes is shown for reference (it can exceed the ids: it hashes cold memory, while the
   ids hash each chunk right after ``deflate`` copied it into cache).
4. Simulation Engine (Ray): ``pickle`` of the Message (protocol 5), ``ray.put`` /
   ``ray.get``, and an actor method call with the Message as argument, returning a small
   value (one direction) or the Message (both directions), as ``RayBackend`` does.
5. decode: ``ArrayRecord.to_torch_state_dict()`` (``np.load`` per Array).
6. load: ``model.load_state_dict(decoded)`` into a second model.
7. by reference: ``write_shared`` into ``/dev/shm``, ``read_shared`` (map + xxh3 digest),
   ``load_state_dict`` from the mapped tensors, and ``message_bytes``.

Run it (about a minute on 2 cores; ``--skip-ray`` saves the Ray start):

    .venv/bin/python benchmarks/message_path.py
    .venv/bin/python benchmarks/message_path.py --repeats 9 --skip-ray
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.metadata
import logging
import os
import pickle
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict
from flwr.supercore.inflatable.inflatable_object import (
    InflatableObject,
    get_all_nested_objects,
    get_object_tree,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

from flower_app.models.factory import build_model
from strategies.transport.shared_weights import message_bytes, read_shared, write_shared

MODEL, NUM_CLASSES, IMAGE_SIZE = "vit_small_patch16_224.dino", 100, 32
MB = 1e6

COPY = "1  copy: Tensor.copy_ into preallocated (unit)"
ENCODE = "2  encode: ArrayRecord(state_dict)"
IDS = "3a object ids: Message.object_id+get_object_tree+get_all_nested"
SHA = "3b   sha256 alone: hashlib.sha256(Array.data) for all Arrays"
DEFLATE = "3c deflate(): every nested object (push_objects' bytes)"
INFLATE = "3d inflate_object_from_contents(ArrayRecord) (receiver)"
DUMPS = "4a pickle.dumps(Message, protocol=5)"
LOADS = "4b pickle.loads(bytes)"
PUT = "4c ray.put(Message)"
GET = "4d ray.get(ref) in the driver"
ONE_WAY = "4e actor call: Message in, int out (one direction)"
BOTH_WAYS = "4f actor call: Message in, Message out (both)"
DECODE = "5  decode: ArrayRecord.to_torch_state_dict()"
LOAD = "6  load: model.load_state_dict(decoded)"
WRITE = "7a write_shared(/dev/shm, state)"
READ = "7b read_shared (mmap + xxh3 digest)"
LOAD_REF = "7c load_state_dict(read_shared tensors)"
MSG_BYTES = "7d message_bytes(state)"

Results = dict[str, list[float]]


def timed(
    fn: Callable[[Any], object], repeats: int, prepare: Callable[[], Any] | None = None
) -> list[float]:
    """Milliseconds of ``fn(prepare())`` per repetition, after one warm-up call.

    ``prepare`` and freeing the result stay outside the clock (freeing 87 MB is not the
    step's cost); the garbage collector is off while the clock runs.
    """
    times: list[float] = []
    for i in range(repeats + 1):
        arg = prepare() if prepare is not None else None
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            result = fn(arg)
            elapsed = (time.perf_counter() - start) * 1e3
        finally:
            gc.enable()
        del result, arg
        if i:
            times.append(elapsed)
    return times


def print_machine() -> None:
    """The facts a reader needs to compare these numbers with another run."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if "model name" in ln), "?"
    )
    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"flwr {importlib.metadata.version('flwr')}, numpy {importlib.metadata.version('numpy')}, "
        f"ray {importlib.metadata.version('ray')}"
    )
    print(
        f"CPU: {model}; os.cpu_count()={os.cpu_count()}, usable={len(os.sched_getaffinity(0))}, "
        f"sha_ni={'sha_ni' in cpuinfo.split()}"
    )
    print(f"load average (1/5/15 min): {os.getloadavg()}")
    print(f"torch.set_num_threads(1): torch runs every step on {torch.get_num_threads()} thread")


def fresh_message(record: ArrayRecord) -> Message:
    """A Message over new Array objects sharing ``record``'s bytes: no cached ids, no copy."""
    arrays = ArrayRecord(
        {
            k: Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data)
            for k, a in record.items()
        }
    )
    return Message(RecordDict({"arrays": arrays}), dst_node_id=1001, message_type=MessageType.TRAIN)


def codec_steps(
    state: Mapping[str, torch.Tensor], target: torch.nn.Module, repeats: int, results: Results
) -> ArrayRecord:
    """Steps 1, 2, 5 and 6: the copy unit, encode, decode and load; returns the record."""
    dst = {k: torch.zeros_like(v) for k, v in state.items()}

    def copy_all(_: object) -> None:
        for k, v in state.items():
            dst[k].copy_(v)

    results[COPY] = timed(copy_all, repeats)
    results[ENCODE] = timed(lambda _: ArrayRecord(dict(state)), repeats)
    record = ArrayRecord(dict(state))
    results[DECODE] = timed(lambda _: record.to_torch_state_dict(), repeats)
    decoded = record.to_torch_state_dict()
    results[LOAD] = timed(lambda _: target.load_state_dict(decoded), repeats)
    return record


def deployment_steps(record: ArrayRecord, repeats: int, results: Results) -> None:
    """Step 3: ids and bytes as the Grid's push computes them, then the receiver's inflate."""
    ids, deflate = [], []
    contents: dict[str, bytes] = {}
    objects: dict[str, InflatableObject] = {}
    for i in range(repeats + 1):
        contents.clear()  # the last repetition's bytes are freed off the clock
        objects.clear()
        message = fresh_message(record)  # new Arrays each time: ids are cached per object
        gc.collect()
        with no_object_id_recompute():
            start = time.perf_counter()
            _ = message.object_id
            get_object_tree(message)
            objects = get_all_nested_objects(message)
            mid = time.perf_counter()
            contents = {oid: obj.deflate() for oid, obj in objects.items()}
            end = time.perf_counter()
        if i:
            ids.append((mid - start) * 1e3)
            deflate.append((end - mid) * 1e3)
    results[IDS], results[DEFLATE] = ids, deflate
    results[SHA] = timed(
        lambda _: [hashlib.sha256(a.data).digest() for a in record.values()], repeats
    )
    record_id = message.content["arrays"].object_id
    results[INFLATE] = timed(
        lambda _: inflate_object_from_contents(record_id, contents, keep_object_contents=True),
        repeats,
    )
    chunks = sum(type(o).__name__ == "ArrayChunk" for o in objects.values())
    wire = sum(len(c) for c in contents.values()) / MB
    print(f"deflated: {len(contents)} objects ({chunks} ArrayChunks), {wire:.1f} MB")


class Echo:
    """A stand-in for Flower's ClientAppActor: only the transfer, no ClientApp work."""

    def take(self, message: Message) -> int:
        return len(message.content.array_records)

    def echo(self, message: Message) -> Message:
        return message


def ray_steps(message: Message, repeats: int, results: Results) -> None:
    """Step 4: the Message as a Ray actor argument and result, as ``RayBackend`` sends it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report: stays offline
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a FutureWarning
    import ray
    import ray.cloudpickle

    if __name__ != "__main__":  # imported, not run: the worker cannot import this module
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    start = time.perf_counter()
    try:
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    except Exception as exc:  # any failure to start means: skip this step
        print(f"ray.init failed after {time.perf_counter() - start:.1f} s ({exc!r}): Ray skipped")
        return
    print(f"ray.init: {time.perf_counter() - start:.1f} s (new local instance, no dashboard)")
    try:
        actor = ray.remote(Echo).remote()
        start = time.perf_counter()
        ray.get(actor.take.remote(message))  # starts the worker, which imports flwr
        print(f"first actor call (worker start + flwr import): {time.perf_counter() - start:.1f} s")
        results[PUT] = timed(lambda _: ray.put(message), repeats)
        results[GET] = timed(ray.get, repeats, prepare=lambda: ray.put(message))
        results[ONE_WAY] = timed(lambda _: ray.get(actor.take.remote(message)), repeats)
        results[BOTH_WAYS] = timed(lambda _: ray.get(actor.echo.remote(message)), repeats)
    finally:
        ray.shutdown()


def pickle_steps(message: Message, repeats: int, results: Results) -> None:
    """Step 4 reference: plain pickling, what Ray's serializer does at the least."""
    results[DUMPS] = timed(lambda _: pickle.dumps(message, protocol=5), repeats)
    data = pickle.dumps(message, protocol=5)
    results[LOADS] = timed(lambda _: pickle.loads(data), repeats)
    print(f"pickled Message: {len(data) / MB:.1f} MB")


def reference_steps(
    state: Mapping[str, torch.Tensor], target: torch.nn.Module, repeats: int, results: Results
) -> None:
    """Step 7: the app's path, weights in a /dev/shm file and a reference in the message."""
    root = Path(tempfile.mkdtemp(prefix="message-path-", dir="/dev/shm"))
    try:
        (root / "run").mkdir()
        results[WRITE] = timed(lambda _: write_shared(root, "run", state), repeats)
        ref = write_shared(root, "run", state)
        results[READ] = timed(lambda _: read_shared(root, ref), repeats)
        results[LOAD_REF] = timed(
            target.load_state_dict, repeats, prepare=lambda: read_shared(root, ref)
        )
        results[MSG_BYTES] = timed(lambda _: message_bytes(state), repeats)
        size = (root / ref.name).stat().st_size / MB
        print(f"shared file: {size:.1f} MB; message_bytes(state) = {ref.nbytes / MB:.1f} MB")
    finally:
        gc.collect()  # the mapped tensors of the last read go before their file
        shutil.rmtree(root, ignore_errors=True)


def print_table(results: Results) -> None:
    """Best and median per step; ``x copy`` is the median over the copy's median."""
    unit = statistics.median(results[COPY])
    print(f"\n{'step':<64} {'best ms':>9} {'median ms':>10} {'x copy':>7}")
    for name, times in results.items():
        med = statistics.median(times)
        print(f"{name:<64} {min(times):>9.1f} {med:>10.1f} {med / unit:>7.1f}")


def print_summary(results: Results) -> None:
    """The two per-message totals the app chooses between."""
    unit = statistics.median(results[COPY])

    def total(*names: str) -> float:
        return sum(statistics.median(results[n]) for n in names)

    if ONE_WAY in results:
        transfer, used = (ONE_WAY,), "2+4e+5+6; Ray figure: 4e, actor call, Message as argument"
    else:
        transfer, used = (DUMPS, LOADS), "2+4a+4b+5+6; Ray skipped: pickle dumps+loads instead"
    path = total(ENCODE, *transfer, DECODE, LOAD)
    by_ref = total(WRITE, READ, LOAD_REF)
    print(
        f"\nmessage path per message, one direction ({used}): "
        f"{path:.1f} ms = {path / unit:.1f} x copy"
    )
    print(
        f"by reference per message (7a+7b+7c; a round's write downstream is shared by its "
        f"messages): {by_ref:.1f} ms = {by_ref / unit:.1f} x copy"
    )
    print(f"one copy (the unit): {unit:.1f} ms; load average now: {os.getloadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per step")
    parser.add_argument("--skip-ray", action="store_true", help="leave out Ray (step 4c-4f)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print_machine()
    torch.manual_seed(0)
    state = build_model(MODEL, NUM_CLASSES, IMAGE_SIZE).state_dict()
    target = build_model(MODEL, NUM_CLASSES, IMAGE_SIZE)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    print(
        f"state dict: {MODEL}, {NUM_CLASSES} classes, {IMAGE_SIZE} px: {len(state)} tensors, "
        f"{nbytes / MB:.1f} MB; {args.repeats} repeats after 1 warm-up"
    )
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # Message needs it
    results: Results = {}
    record = codec_steps(state, target, args.repeats, results)
    deployment_steps(record, args.repeats, results)
    message = fresh_message(record)
    pickle_steps(message, args.repeats, results)
    if not args.skip_ray:
        ray_steps(message, args.repeats, results)
    reference_steps(state, target, args.repeats, results)
    order = [
        COPY,
        ENCODE,
        IDS,
        SHA,
        DEFLATE,
        INFLATE,
        DUMPS,
        LOADS,
        PUT,
        GET,
        ONE_WAY,
        BOTH_WAYS,
        DECODE,
        LOAD,
        WRITE,
        READ,
        LOAD_REF,
        MSG_BYTES,
    ]
    ordered = {name: results[name] for name in order if name in results}
    print_table(ordered)
    print_summary(ordered)


if __name__ == "__main__":
    main()
