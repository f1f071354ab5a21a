"""The node's side of the weight transport, as a Flower ClientApp mod (``node_transport``).

Flower's own place to intercept a node's messages: every message passes the mod before its
handler and every reply after it, so the handlers see ``ArrayRecord``s and tensors only.

Before the handler: weights that came by reference become ``MappedArrays`` (the run
folder's file, mapped read-only once per worker when the handler first asks for the
tensors); a sparse mask that came (packed or by reference) is kept in the node's state,
which Flower keeps per node for the whole run, and the mask the message assumes is put back
into the message for the handler (a missing one is the one-line error it always was).
After the handler: a partition query's reply gets the answer to the shared-folder probe; a
reply's tensors go by reference into the folder the request's weights came from (written
straight from a ``TensorRecord``'s tensors: no serialized copy), else in the message; the
write time joins the reply's ``client-encode-seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from strategies import protocol
from strategies.tensor_record import TensorRecord, record_tensors
from strategies.transport.shared_weights import (
    WeightRef,
    answer_probe,
    read_shared,
    reply_records,
    shared_root,
)

MASK_KEYS = (protocol.MASK, protocol.ref_key(protocol.MASK))  # packed, or its file's reference


class MappedArrays(TensorRecord):
    """The tensors of a file of the run folder, mapped (and their digest checked) the first
    time they are asked for. With ``remember`` (the global weights) the same read-only
    tensors serve every client of a worker while the file is unchanged. The file's digest
    is the record's identity."""

    def __init__(self, ref: WeightRef, remember: bool = False) -> None:
        super().__init__({})
        self.__dict__["_ref"], self.__dict__["_remember"] = ref, remember

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        if not self.__dict__["_tensors"]:
            ref, remember = self.__dict__["_ref"], self.__dict__["_remember"]
            self.__dict__["_tensors"] = read_shared(shared_root(), ref, remember=remember)
        return self.__dict__["_tensors"]

    @property
    def object_id(self) -> str:
        return self.__dict__["_ref"].digest


def node_transport(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """The ClientApp mod: records by reference in, the mask kept, replies by reference out."""
    content = msg.content
    probe = content.config_records.get(protocol.SHARED_PROBE)
    sent = content.config_records.get(protocol.ref_key(protocol.ARRAYS))
    if sent is not None:
        del content[protocol.ref_key(protocol.ARRAYS)]
        content[protocol.ARRAYS] = MappedArrays(WeightRef.from_record(sent), remember=True)
    keep_mask(content, context)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    if probe is not None:  # the request still holds it: no handler removes a record
        reply.content[protocol.SHARED_PROBE] = answer_probe(content)
    t0 = time.perf_counter()
    carried = False
    for key in protocol.REPLY_TENSORS:
        record = reply.content.array_records.get(key)
        if record is not None:
            del reply.content[key]
            reply.content.update(outgoing(sent, key, record))
            carried = True
    metrics = reply.content.metric_records.get(protocol.METRICS)
    if carried and metrics is not None and protocol.CLIENT_ENCODE_SECONDS in metrics:
        seconds = float(metrics[protocol.CLIENT_ENCODE_SECONDS]) + time.perf_counter() - t0
        metrics[protocol.CLIENT_ENCODE_SECONDS] = seconds
    return reply


def outgoing(
    sent: ConfigRecord | None, key: str, record: ArrayRecord
) -> dict[str, ArrayRecord | ConfigRecord]:
    """A reply's record as it travels: by reference when the request's weights came so
    (written from the tensors themselves), else a plain ArrayRecord."""
    if sent is None:
        return {key: record.as_array_record() if isinstance(record, TensorRecord) else record}
    tensors = record_tensors(record)
    request = RecordDict({protocol.ref_key(protocol.ARRAYS): sent})
    return reply_records(request, key, tensors)


def keep_mask(content: RecordDict, context: Context) -> None:
    """Keep a mask that came in the node's state (packed, or the reference of its file: a
    reference keeps a simulation's K node contexts small); put the mask of the message's
    version into the message for the handler. Dense messages carry no mask version."""
    config = content.config_records.get(protocol.CONFIG)
    if config is None or protocol.MASK_VERSION not in config:
        return
    version = int(config[protocol.MASK_VERSION])
    sent = [key for key in MASK_KEYS if key in content]
    if sent:
        for key in MASK_KEYS:  # the new mask replaces the old, whichever way either came
            context.state.pop(key, None)
        context.state[sent[0]] = content[sent[0]]
        context.state[protocol.MASK_VERSION] = ConfigRecord({protocol.MASK_VERSION: version})
        for key in sent:
            del content[key]
    held = context.state.get(protocol.MASK_VERSION)
    if held is None or int(held[protocol.MASK_VERSION]) != version:
        raise RuntimeError(f"node holds no mask of version {version}; the server must send it")
    ref = context.state.config_records.get(protocol.ref_key(protocol.MASK))
    if ref is not None:
        content[protocol.MASK] = MappedArrays(WeightRef.from_record(ref))
    else:
        content[protocol.MASK] = context.state.array_records[protocol.MASK]
