"""ClientApp: thin handlers that decode a message, call ``clients/``, encode the reply.

Flower rebuilds the ClientApp for every message, but in a simulation this module lives
on in each worker process: the model, the dataset tensors and the partition index are
cached here and reused across rounds, so a round only loads new weights in place. The
Deployment Engine starts a fresh process per message instead, so importing this module
is kept cheap (no Hugging Face ``datasets``; imports without the cyclic GC).
"""

from __future__ import annotations

from flower_app.perf.fast_import import imports_without_gc

# a deployment starts this process for every message: see flower_app.perf.fast_import
with imports_without_gc():
    import time
    from dataclasses import dataclass
    from pathlib import Path

    import numpy as np
    import torch
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from torch import nn

    from clients.fisher import diagonal_fisher
    from clients.masking import MaskCache, NodeMask, damp_frozen, trained_values
    from clients.optimizers import build_optimizer
    from clients.training import copy_weights_into, train_local
    from flower_app.config import RunConfig
    from flower_app.data.preprocessing import batch_preprocessor, preprocess_batch
    from flower_app.data.sources import ImageSplit, load_node_data
    from flower_app.models.factory import build_model
    from flower_app.perf.allocator import keep_freed_memory
    from flower_app.runs.injected_failures import injected_failures
    from flower_app.runs.node_identity import node_partition_id
    from flower_app.runs.runtime import resolve_device, run_splits, use_bf16
    from flower_app.runs.worker_gpus import worker_placement
    from strategies import protocol
    from strategies.seeds import derive_seed
    from strategies.sparse_codec import decode_mask, mask_positions
    from strategies.tensor_record import TensorRecord, record_tensors
    from strategies.transport.node import node_transport

# mods: the weight transport (references, the node's mask, the probe; handlers see
# ArrayRecords and tensors) and client-failure-rate's failures on purpose
app = ClientApp(mods=[node_transport, injected_failures])


@dataclass
class ClientRuntime:
    """What a worker process keeps between messages."""

    model: nn.Module
    train: ImageSplit  # the whole training split, on the compute device
    shard: torch.Tensor  # this client's indices into ``train`` (CPU, int64)
    device: torch.device
    bf16: bool
    step_model: nn.Module  # what training calls: ``model`` or its compiled wrapper


COMPILE_BACKEND = "inductor"  # tests swap in "aot_eager" (same graph capture, no C++ build)

_MODELS: dict[tuple, nn.Module] = {}
_COMPILED: dict[tuple, nn.Module] = {}
_DATA: dict[tuple, ImageSplit] = {}
_PARTITIONS: dict[tuple, list[np.ndarray]] = {}


def _step_model(model_key: tuple, model: nn.Module, compile_model: bool) -> nn.Module:
    """The model, or a ``torch.compile`` wrapper of it built once per worker process.

    The wrapper shares the model's parameters, so weights loaded into the model and the
    optimizer over its parameters serve both; only the forward/backward graphs differ.
    """
    if not compile_model:
        return model
    key = (*model_key, COMPILE_BACKEND)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(model, backend=COMPILE_BACKEND)
    return _COMPILED[key]


def get_runtime(cfg: RunConfig, partition_id: int, node_data_dir: str = "") -> ClientRuntime:
    """Build once per process, then reuse: model, training tensors on device, partition.

    With a node-config ``data-dir`` the node trains on its own data (deployment: one
    private data set per SuperNode); otherwise on shard ``partition-id`` of the
    run-config's data set, partitioned the same way on every node.
    """
    keep_freed_memory()  # a fresh optimizer per message: its pages stay in the heap
    device = resolve_device(cfg.device)
    model_key = (cfg.model, cfg.num_classes, cfg.image_size, str(device))
    if model_key not in _MODELS:
        _MODELS[model_key] = build_model(cfg.model, cfg.num_classes, cfg.image_size).to(device)
    bf16 = use_bf16(cfg.precision, device)
    model = _MODELS[model_key]
    step_model = _step_model(model_key, model, cfg.compile)
    if node_data_dir:
        key = ("node", node_data_dir, str(device))
        if key not in _DATA:
            own = load_node_data(Path(node_data_dir))
            _DATA[key] = ImageSplit(own.images.to(device), own.labels.to(device))
        train = _DATA[key]
        return ClientRuntime(model, train, torch.arange(len(train)), device, bf16, step_model)
    data_key = (cfg.dataset, str(cfg.data_path), cfg.val_fraction, cfg.seed)
    data_key += (cfg.synthetic_train_per_class, cfg.task_class_ids, str(device))
    if data_key not in _DATA:
        splits = run_splits(cfg)
        _DATA[data_key] = ImageSplit(splits.train.images.to(device), splits.train.labels.to(device))
    train = _DATA[data_key]
    part_key = (*data_key, cfg.num_clients, cfg.sharding, cfg.classes_per_client)
    part_key += tuple(cfg.shard_options.values())
    if part_key not in _PARTITIONS:
        # Flower Datasets and Hugging Face datasets: imported only by a process that shards
        from flower_app.data.partitioners import partition_indices

        _PARTITIONS[part_key] = partition_indices(
            train.labels.cpu().numpy(),
            cfg.num_clients,
            cfg.sharding,
            cfg.classes_per_client,
            cfg.seed,
            **cfg.shard_options,
        )
    shard = torch.from_numpy(_PARTITIONS[part_key][partition_id])
    return ClientRuntime(model, train, shard, device, bf16, step_model)


def node_runtime(context: Context) -> tuple[RunConfig, int, ClientRuntime]:
    """The run-config, this node's partition id and its cached runtime.

    The node checks the schema and its own data only: the coordinator's files
    (``pretrained-path``, its evaluation data) need not exist here.
    """
    cfg = RunConfig.from_run_config(dict(context.run_config), check_files=False)
    pid = node_partition_id(context.node_config, cfg.num_clients)
    data_dir = str(context.node_config.get("data-dir", ""))
    return cfg, pid, get_runtime(cfg, pid, data_dir)


def _generators(
    cfg: RunConfig, purposes: tuple[str, str], server_round: int, pid: int, device: torch.device
) -> tuple[torch.Generator, torch.Generator]:
    """A CPU and a device generator seeded from (seed, purpose, global round, partition)."""
    first, second = (derive_seed(cfg.seed, p, server_round, pid) for p in purposes)
    return torch.Generator().manual_seed(first), torch.Generator(device=device).manual_seed(second)


def _synchronized_clock(device: torch.device) -> float:
    """``perf_counter`` after the GPU's queued work is done, so timings measure compute."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _load_weights(model: nn.Module, content: RecordDict) -> None:
    """Copy the received weights into the cached model's tensors (no new model)."""
    copy_weights_into(model, record_tensors(content[protocol.ARRAYS]))


def node_mask(msg: Message) -> NodeMask | None:
    """The sparse mask this message assumes (the node keeps it between messages: the
    transport mod puts it back into each message); None for dense messages."""
    if protocol.MASK_VERSION not in msg.content[protocol.CONFIG]:
        return None
    record = msg.content[protocol.MASK]
    return _MASKS.get(record.object_id, lambda: _decode_mask(record))


_MASKS = MaskCache()  # this worker process's last mask, by Flower's content id of its record


def _decode_mask(record: ArrayRecord) -> NodeMask:
    bits = decode_mask(record_tensors(record))
    return NodeMask(bits, mask_positions(bits))


def _train_metrics(
    rt: ClientRuntime, pid: int, loss: float, seconds: tuple[float, float, float]
) -> MetricRecord:
    """What a train reply reports; ``seconds``: (load, compute, encode)."""
    metrics = MetricRecord(
        {
            protocol.NUM_EXAMPLES: len(rt.shard),
            protocol.PARTITION_ID: pid,
            protocol.TRAIN_LOSS: loss,
            protocol.CLIENT_SECONDS: seconds[1],
            protocol.CLIENT_LOAD_SECONDS: seconds[0],
            protocol.CLIENT_ENCODE_SECONDS: seconds[2],
        }
    )
    if rt.device.type == "cuda":
        metrics[protocol.GPU_MEMORY_MB] = torch.cuda.max_memory_allocated(rt.device) / 2**20
    metrics.update(worker_placement())  # in a Ray actor: which worker and GPU trained
    return metrics


@app.train()
def train(msg: Message, context: Context) -> Message:
    """J local steps from the received global weights with the run's optimizer (sgdm or
    adamw), dense or over the mask."""
    cfg, pid, rt = node_runtime(context)
    t_load = time.perf_counter()
    _load_weights(rt.model, msg.content)
    config = msg.content[protocol.CONFIG]
    server_round, lr = int(config[protocol.SERVER_ROUND]), float(config[protocol.LR])
    mask = node_mask(msg)
    load_seconds = time.perf_counter() - t_load  # the weights and the mask
    train_head = bool(config.get(protocol.TRAIN_HEAD, True))
    settings = cfg.optimizer_settings(lr, str(config.get(protocol.LOCAL_OPTIMIZER, cfg.optimizer)))
    optimizer = build_optimizer(rt.model, settings, mask, train_head, protocol.HEAD_PREFIX)
    batch_gen, augment_gen = _generators(cfg, ("batches", "augment"), server_round, pid, rt.device)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    t_start = _synchronized_clock(rt.device)
    try:
        result = train_local(
            rt.step_model,
            optimizer,
            rt.train.images,
            rt.train.labels,
            rt.shard,
            cfg.local_steps,
            cfg.batch_size,
            batch_preprocessor(cfg.image_size),
            batch_gen,
            augment_gen,
            rt.bf16,
            cfg.proximal_mu,
        )
    finally:
        rt.model.requires_grad_(True)  # the cached model is reused by the next message
    seconds = _synchronized_clock(rt.device) - t_start
    t_encode = time.perf_counter()
    trained = TensorRecord(trained_values(rt.model, mask, train_head, protocol.HEAD_PREFIX))
    encode_seconds = time.perf_counter() - t_encode  # the transport adds its writing
    timings = (load_seconds, seconds, encode_seconds)
    metrics = _train_metrics(rt, pid, result.mean_loss, timings)
    content = RecordDict({protocol.ARRAYS: trained, protocol.METRICS: metrics})
    return Message(content, reply_to=msg)


@app.query("fisher")
def fisher(msg: Message, context: Context) -> Message:
    """Diagonal Fisher of the currently trainable entries on up to ``fisher-samples`` examples."""
    cfg, pid, rt = node_runtime(context)
    _load_weights(rt.model, msg.content)
    mask = node_mask(msg)
    if mask is None:
        raise RuntimeError("a Fisher query must carry a mask version")
    config = msg.content[protocol.CONFIG]
    server_round = int(config[protocol.SERVER_ROUND])
    purposes = ("fisher-examples", "fisher-labels")
    pick_gen, label_gen = _generators(cfg, purposes, server_round, pid, rt.device)
    count = min(int(config[protocol.FISHER_SAMPLES]), len(rt.shard))
    # sorted: all of a shard's examples give the same Fisher in every round, bit for bit
    picked = torch.randperm(len(rt.shard), generator=pick_gen)[:count].sort().values
    idx = rt.shard[picked].to(rt.device)
    damp_frozen(rt.model, mask.bits, float(config.get(protocol.CALIBRATION_DAMPING, 1.0)))
    images = preprocess_batch(rt.train.images[idx], cfg.image_size, False, None)
    names = [n for n in mask.bits if mask.trainable(n)]
    scores = diagonal_fisher(
        rt.model,
        images,
        rt.train.labels[idx],
        names,
        str(config[protocol.FISHER_LABELS]),
        cfg.fisher_batch_size,
        label_gen,
        score=str(config[protocol.FISHER_SCORE]),
    )
    full = {n: scores.get(n, torch.zeros(m.shape, device=rt.device)) for n, m in mask.bits.items()}
    metrics = MetricRecord({protocol.NUM_EXAMPLES: count, protocol.PARTITION_ID: pid})
    content = RecordDict(
        {protocol.FISHER: TensorRecord(mask.gather(full)), protocol.METRICS: metrics}
    )
    return Message(content, reply_to=msg)


@app.query("partition")
def query_partition(msg: Message, context: Context) -> Message:
    """Which shard this node holds: its id, size and class histogram (for the summary)."""
    _, pid, rt = node_runtime(context)
    labels = rt.train.labels[rt.shard.to(rt.device)].cpu()
    classes, counts = torch.unique(labels, return_counts=True)
    metrics = MetricRecord(
        {
            protocol.PARTITION_ID: pid,
            protocol.NUM_EXAMPLES: len(rt.shard),
            protocol.CLASSES: [int(c) for c in classes],
            protocol.CLASS_COUNTS: [int(c) for c in counts],
        }
    )
    return Message(RecordDict({protocol.METRICS: metrics}), reply_to=msg)
