"""Why a client's reply must not be aggregated: small pure checks that return a reason.

A reply is untrusted input: a tensor missing or added, another shape or dtype, NaN or
inf from a diverged client, or a claimed ``num-examples`` that is not the node's shard
would crash the aggregation or bias the global model. Each check returns "" when the
reply is acceptable, else a one-line reason; the strategies say what they expect
(a ``Layout``) and turn a reason into a failed client (``strategies/rounds.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from strategies import protocol
from strategies.tensor_record import array_tensor


class TensorSpec(NamedTuple):
    """The shape and dtype a tensor of a reply must have."""

    shape: tuple[int, ...]
    dtype: torch.dtype


Layout = dict[str, TensorSpec]  # tensor name -> spec, in the order aggregation reads them
MAX_NAMES = 3  # a reason names at most this many tensors


def torch_dtype(numpy_dtype: str) -> torch.dtype:
    """The torch dtype of a numpy dtype name (an ``Array``'s metadata)."""
    return torch.from_numpy(np.empty(0, dtype=np.dtype(numpy_dtype))).dtype


def dense_layout(arrays: ArrayRecord) -> Layout:
    """What a dense reply holds: every sent tensor, same shape and dtype (read from metadata)."""
    return {n: TensorSpec(tuple(a.shape), torch_dtype(a.dtype)) for n, a in arrays.items()}


def masked_layout(mask: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype]) -> Layout:
    """What the sparse codec sends per mask tensor: a 1-D vector of its True entries' values.

    Tensors with no True entry still travel (as empty vectors), as ``gather_masked`` sends them.
    """
    return {n: TensorSpec((int(m.sum()),), dtypes[n]) for n, m in mask.items()}


def head_layout(layout: Layout, head_prefix: str = protocol.HEAD_PREFIX) -> Layout:
    """The dense classifier head's part of a layout."""
    return {n: spec for n, spec in layout.items() if n.startswith(head_prefix)}


def _names(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:MAX_NAMES])
    return shown + (f" and {len(names) - MAX_NAMES} more" if len(names) > MAX_NAMES else "")


def names_problem(names: Iterable[str], layout: Layout) -> str:
    """Missing or extra tensors (checked on names alone, before anything is decoded)."""
    names = list(names)
    present = set(names)
    missing = [n for n in layout if n not in present]
    extra = [n for n in names if n not in layout]
    if missing:
        return f"{len(missing)} tensor(s) missing: {_names(missing)}"
    if extra:
        return f"{len(extra)} unexpected tensor(s): {_names(extra)}"
    return ""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_problem(
    name: str, tensor: torch.Tensor, spec: TensorSpec, nonnegative: bool = False
) -> str:
    """Another shape or dtype than ``spec``, non-finite values, or (Fisher) negative ones."""
    if tuple(tensor.shape) != tuple(spec.shape):
        return f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(spec.shape)}"
    if tensor.dtype != spec.dtype:
        return (
            f"tensor {name!r} has dtype {_dtype_name(tensor.dtype)}, "
            f"expected {_dtype_name(spec.dtype)}"
        )
    bad = non_finite(tensor)
    if bad:
        return f"tensor {name!r} holds {bad} non-finite value(s) (NaN/inf)"
    if nonnegative and tensor.numel() and bool(tensor.min() < 0):
        return f"tensor {name!r} holds {int((tensor < 0).sum())} negative value(s)"
    return ""


def non_finite(tensor: torch.Tensor) -> int:
    """How many NaN/inf entries a tensor holds.

    A NaN or inf entry makes the sum NaN or inf, so a finite sum proves every entry finite
    at the cost of one reduction (several times cheaper than ``isfinite(t).all()``, which
    writes a bool tensor); only a non-finite sum, possibly a finite overflow, is counted.
    """
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return 0
    return int((~torch.isfinite(tensor)).sum())


def state_problem(
    state: Mapping[str, torch.Tensor], layout: Layout, nonnegative: bool = False
) -> str:
    """The first problem of decoded tensors against ``layout`` ("" when they fit)."""
    problem = names_problem(state, layout)
    for name in layout:
        if problem:
            break
        problem = tensor_problem(name, state[name], layout[name], nonnegative)
    return problem


def checked_tensors(
    arrays: ArrayRecord, layout: Layout, nonnegative: bool = False
) -> tuple[dict[str, torch.Tensor], str]:
    """Decode ``arrays`` once, in ``layout``'s order, checking each tensor as it is decoded.

    Returns the tensors and "" when every one fits, else ``({}, reason)``; names are
    checked before anything is decoded, and an undecodable array is a reason too.
    """
    problem = names_problem(arrays.keys(), layout)
    if problem:
        return {}, problem
    state: dict[str, torch.Tensor] = {}
    for name, spec in layout.items():
        try:
            state[name] = array_tensor(arrays[name])
        except Exception as exc:  # untrusted bytes: whatever numpy or torch raises
            reason = " ".join(str(exc).split())[:120]
            return {}, f"tensor {name!r} cannot be decoded ({type(exc).__name__}: {reason})"
        problem = tensor_problem(name, state[name], spec, nonnegative)
        if problem:
            return {}, problem
    return state, ""


@runtime_checkable
class ReadsChecked(Protocol):
    """A record whose tensors live elsewhere (a file the transport names) and are checked
    as they are read, instead of decoded from the message."""

    def read_checked(
        self, layout: Layout, nonnegative: bool = False
    ) -> tuple[dict[str, torch.Tensor], str]: ...


def reply_tensors(
    reply: Message, key: str, layout: Layout, nonnegative: bool = False
) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of the reply's record ``key``, checked against ``layout``: ``(tensors,
    "")``, or ``({}, reason)``; however they travelled, the same checks."""
    record = reply.content.array_records.get(key)
    if record is None:
        return {}, f"no {key!r} record"
    if isinstance(record, ReadsChecked):
        return record.read_checked(layout, nonnegative)
    return checked_tensors(record, layout, nonnegative)


def number(metrics: MetricRecord | None, key: str) -> float | None:
    """A metric as a float, or None when it is missing or not a single number."""
    if metrics is None or key not in metrics:
        return None
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def identity_problem(metrics: MetricRecord | None, partition: int | None) -> str:
    """A reply must come from a known node and name the partition it was asked for."""
    if metrics is None:
        return f"no {protocol.METRICS!r} record"
    if partition is None:
        return "reply from a node that holds no known partition"
    claimed = number(metrics, protocol.PARTITION_ID)
    if claimed != partition:
        shown = metrics.get(protocol.PARTITION_ID)
        return (
            f"{protocol.PARTITION_ID} {shown!r}, but the message was sent to partition {partition}"
        )
    return ""


def train_metrics_problem(
    metrics: MetricRecord | None, partition: int | None, shard_size: int | None
) -> str:
    """Identity, ``num-examples`` equal to the node's shard (when known), a finite loss."""
    problem = identity_problem(metrics, partition)
    if problem:
        return problem
    examples = number(metrics, protocol.NUM_EXAMPLES)
    if examples is None or not math.isfinite(examples) or examples <= 0:
        return f"{protocol.NUM_EXAMPLES} {metrics.get(protocol.NUM_EXAMPLES)!r} is not a count > 0"
    if shard_size is not None and examples != shard_size:
        return f"{protocol.NUM_EXAMPLES} {examples:g}, but partition {partition} holds {shard_size}"
    loss = number(metrics, protocol.TRAIN_LOSS)
    if loss is None or not math.isfinite(loss):
        return f"{protocol.TRAIN_LOSS} {metrics.get(protocol.TRAIN_LOSS)!r} is not a finite number"
    timings = (protocol.CLIENT_LOAD_SECONDS, protocol.CLIENT_ENCODE_SECONDS)
    for key in (protocol.CLIENT_SECONDS, protocol.GPU_MEMORY_MB, *timings):
        if key in metrics and number(metrics, key) is None:
            return f"{key} {metrics[key]!r} is not a number"
    return placement_problem(metrics)


def placement_problem(metrics: MetricRecord) -> str:
    """Where a client trained is reported in integers (a device id that is no index: -1)."""
    for key in protocol.PLACEMENT_KEYS:
        if key not in metrics:
            continue
        value = metrics[key]
        listed = key in (protocol.RAY_GPU_IDS, protocol.CUDA_VISIBLE_DEVICES)
        values = value if listed and isinstance(value, list) else [value]
        if listed != isinstance(value, list) or not all(type(v) is int for v in values):
            kind = "a list of integers" if listed else "an integer"
            return f"{key} {value!r} is not {kind}"
    return ""


def fisher_metrics_problem(
    metrics: MetricRecord | None, partition: int | None, limit: int | None
) -> str:
    """Identity, and ``num-examples`` in 1..``limit`` (min of fisher-samples and the shard)."""
    problem = identity_problem(metrics, partition)
    if problem:
        return problem
    examples = number(metrics, protocol.NUM_EXAMPLES)
    if examples is None or not math.isfinite(examples) or examples < 1:
        return f"{protocol.NUM_EXAMPLES} {metrics.get(protocol.NUM_EXAMPLES)!r} is not a count > 0"
    if limit is not None and examples > limit:
        return f"{protocol.NUM_EXAMPLES} {examples:g} exceeds {limit} (fisher-samples, shard size)"
    return ""
