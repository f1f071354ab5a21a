"""ServerApp: parse the run-config, prepare data and model, run FedAvg, write results."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from clients.training import evaluate
from flower_app.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    Checkpointer,
    CheckpointError,
    check_identity,
    load_checkpoint,
)
from flower_app.config import ConfigError, RunConfig
from flower_app.data import ImageSplit, batch_preprocessor
from flower_app.results import (
    BestModel,
    MetricsTable,
    ProgressLog,
    RunDirectory,
    partitions_frame,
    task_vector,
    write_summary,
)
from flower_app.runtime import initial_model, resolve_device, run_splits, use_bf16
from flower_app.schedule import lr_at_round
from strategies import protocol
from strategies.fedavg import CentralEvaluate, OrderedFedAvg, RoundHook
from strategies.masks import eligible_names
from strategies.sparse_fedavg import SparseFedAvg, mask_density

app = ServerApp()

NODE_COUNT_SETTLE_S = 5.0  # simulation registers all nodes at once; a stable count is final


class FederationMismatchError(RuntimeError):
    """The federation does not have ``num-clients`` nodes."""


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    """Node ids once exactly ``expected`` are connected; fail fast on any other stable count."""
    start = time.monotonic()
    last_count, last_change = -1, start
    while True:
        nodes = sorted(grid.get_node_ids())
        now = time.monotonic()
        if len(nodes) == expected:
            return nodes
        if len(nodes) != last_count:
            last_count, last_change = len(nodes), now
        settled = len(nodes) > 0 and now - last_change >= NODE_COUNT_SETTLE_S
        if len(nodes) > expected or settled or now - start >= timeout:
            raise FederationMismatchError(
                f"run-config num-clients={expected} but the federation has {len(nodes)} "
                f"SuperNodes; in simulation run: flwr run . --federation-config "
                f'"num-supernodes={expected}" (or set num-clients={len(nodes)}); in deployment '
                f"start {expected} SuperNodes before flwr run"
            )
        time.sleep(0.2)


def query_partitions(grid: Grid, node_ids: list[int], timeout: float) -> list[dict]:
    """Ask every node which shard it holds (loads data and partition on each worker once)."""
    messages = [
        Message(RecordDict(), dst_node_id=nid, message_type=protocol.QUERY_PARTITION)
        for nid in node_ids
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    failed = [r.error.reason for r in replies if r.has_error()]
    if failed or len(replies) != len(node_ids):
        raise RuntimeError(
            f"partition query: {len(node_ids) - len(replies) + len(failed)} of {len(node_ids)} "
            f"nodes did not answer; first error: {failed[0] if failed else 'timeout'}"
        )
    out = []
    for reply in replies:
        metrics = reply.content[protocol.METRICS]
        out.append({key: metrics[key] for key in metrics} | {"node-id": reply.metadata.src_node_id})
    pids = sorted(int(r[protocol.PARTITION_ID]) for r in out)
    if pids != list(range(len(node_ids))):
        raise RuntimeError(f"nodes must hold partitions 0..{len(node_ids) - 1}, got {pids}")
    return out


class CentralEvaluator:
    """The global model evaluated on the server's validation or test split."""

    def __init__(self, model: torch.nn.Module, cfg: RunConfig, device: torch.device) -> None:
        self.model = model.to(device)
        self.cfg = cfg
        self.device = device
        self.bf16 = use_bf16(cfg.precision, device)
        self.preprocess = batch_preprocessor(cfg.image_size)

    def __call__(self, arrays: ArrayRecord, split: ImageSplit) -> tuple[float, float]:
        self.model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        return evaluate(
            self.model,
            split.images,
            split.labels,
            self.cfg.eval_batch_size,
            self.preprocess,
            self.bf16,
        )


def _to_device(split: ImageSplit, device: torch.device) -> ImageSplit:
    return ImageSplit(split.images.to(device), split.labels.to(device))


def build_strategy(
    cfg: RunConfig,
    model: torch.nn.Module,
    partition_to_node: dict[int, int],
    central_evaluate: CentralEvaluate | None,
    hooks: list[RoundHook],
    calibration_table: MetricsTable,
) -> OrderedFedAvg:
    """The strategy the run-config's ``strategy`` names."""
    common = {
        "partition_to_node": partition_to_node,
        "clients_per_round": cfg.clients_per_round,
        "seed": cfg.seed,
        "lr_at": functools.partial(lr_at_round, cfg=cfg),
        "num_rounds": cfg.num_server_rounds,
        "eval_every": cfg.eval_every,
        "central_evaluate": central_evaluate,
        "hooks": hooks,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_clients": cfg.min_train_clients,
        "max_round_retries": cfg.max_round_retries,
        "round_timeout": cfg.round_timeout,
        "update_metrics": cfg.update_metrics,
    }
    if cfg.strategy == "fedavg":
        return OrderedFedAvg(**common)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return SparseFedAvg(
        eligible=eligible_names(shapes, cfg.mask_scope),
        head_mode=cfg.head,
        head_warmup_rounds=cfg.head_warmup_rounds,
        sparsity=cfg.sparsity,
        mask_strategy=cfg.mask_strategy,
        calibration_rounds=cfg.calibration_rounds,
        calibration_schedule=cfg.calibration_schedule,
        calibration_clients=cfg.calibration_clients,
        fisher_config={
            protocol.FISHER_SAMPLES: cfg.fisher_samples,
            protocol.FISHER_LABELS: cfg.fisher_labels,
        },
        warmup_lr=cfg.lr,
        calibration_hooks=[calibration_table.append],
        **common,
    )


def writable_output_dir(output_dir: str) -> Path:
    """The absolute output folder, created if needed; unwritable is a one-line error."""
    path = Path(os.path.expanduser(output_dir)).resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"run-config key 'output-dir' = {output_dir!r} is not allowed: cannot write to "
            f"{path} ({exc.strerror or exc})"
        ) from exc
    return path


def restore(
    checkpoint: Checkpoint,
    strategy: OrderedFedAvg,
    metrics: MetricsTable,
    calibration: MetricsTable,
    best: BestModel,
) -> None:
    """Put a checkpoint's state back into the strategy and the round hooks."""
    strategy.resume_offset = checkpoint.phase_round
    strategy.round_offset = checkpoint.round_offset
    metrics.rows = list(checkpoint.metrics_rows)
    calibration.rows = list(checkpoint.calibration_rows)
    best.accuracy, best.round = checkpoint.best_accuracy, checkpoint.best_round
    best.state = checkpoint.best_state
    if isinstance(strategy, SparseFedAvg):
        if checkpoint.mask is None:
            raise CheckpointError("checkpoint of a sparse run holds no mask")
        strategy.restore_mask(checkpoint.mask)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate, prepare, train for ``num-server-rounds``, then test and write results."""
    t_start = time.perf_counter()
    cfg = RunConfig.from_run_config(dict(context.run_config))
    output_dir = writable_output_dir(cfg.output_dir)
    run_name = cfg.resolved_run_name(time.strftime("%Y%m%d-%H%M%S"))
    checkpoint = None
    if cfg.resume:
        path = output_dir / run_name / CHECKPOINT_NAME
        if not path.is_file():
            raise ConfigError(
                f"run-config key 'resume' = True is not allowed: no checkpoint at {path} "
                "(a run writes one every checkpoint-every training rounds)"
            )
        checkpoint = load_checkpoint(path)
        check_identity(checkpoint.identity, cfg.experiment_identity(), path)
    elif (output_dir / run_name).exists():
        RunDirectory.create(output_dir, run_name)  # raises the one-line error
    node_ids = wait_for_nodes(grid, cfg.num_clients, cfg.node_wait_timeout)

    device = resolve_device(cfg.device)
    splits = run_splits(cfg)
    model = initial_model(cfg)
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if checkpoint is not None:
        initial_state = checkpoint.initial
    start_state = checkpoint.arrays if checkpoint is not None else initial_state
    initial = ArrayRecord(start_state)
    val, test = _to_device(splits.val, device), _to_device(splits.test, device)
    evaluator = CentralEvaluator(model, cfg, device)

    partitions = query_partitions(grid, node_ids, cfg.round_timeout)
    if checkpoint is None:
        run_dir = RunDirectory.create(output_dir, run_name)
        run_dir.write_json("config.json", cfg.to_dict() | {"run-name": run_name})
    else:
        run_dir = RunDirectory(output_dir / run_name)
    run_dir.write_csv("partitions.csv", partitions_frame(partitions))
    print(f"run directory: {run_dir.path}", flush=True)

    metrics, best = MetricsTable(run_dir), BestModel()
    calibration = MetricsTable(run_dir, "calibration.csv", [])
    strategy = build_strategy(
        cfg,
        model,
        partition_to_node={int(p[protocol.PARTITION_ID]): p["node-id"] for p in partitions},
        central_evaluate=functools.partial(evaluator, split=val) if len(val.labels) else None,
        hooks=[metrics, best, ProgressLog(cfg.num_server_rounds)],
        calibration_table=calibration,
    )
    strategy.hooks.append(  # last: it saves what the hooks before it recorded
        Checkpointer(
            run_dir,
            cfg.checkpoint_every,
            strategy,
            cfg.experiment_identity(),
            initial_state,
            metrics,
            calibration,
            best,
        )
    )
    if checkpoint is not None:
        restore(checkpoint, strategy, metrics, calibration, best)
        print(f"resuming after training round {checkpoint.phase_round}", flush=True)
    remaining = cfg.num_server_rounds - strategy.resume_offset
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=remaining,
        timeout=cfg.round_timeout,
        train_config=ConfigRecord(),
        evaluate_fn=strategy.on_round_end,
    )
    final_arrays = result.arrays if remaining > 0 else initial
    final_state = final_arrays.to_torch_state_dict()
    test_loss, test_acc = evaluator(final_arrays, test)
    best_state = best.state if best.state is not None else final_state
    best_test_loss, best_test_acc = evaluator(ArrayRecord(best_state), test)
    run_dir.save_weights("final_model.safetensors", final_state)
    run_dir.save_weights("best_model.safetensors", best_state)
    run_dir.save_weights("task_vector.safetensors", task_vector(final_state, initial_state))
    sparse_summary = {}
    if isinstance(strategy, SparseFedAvg):
        run_dir.save_weights(
            "mask.safetensors", {k: m.to(torch.uint8) for k, m in strategy.mask.items()}
        )
        sparse_summary = {
            "mask-density": mask_density(strategy.mask),
            "mask-strategy": cfg.mask_strategy,
        }
    write_summary(
        run_dir,
        run_name,
        metrics.frame(),
        best,
        cfg.num_server_rounds,
        (test_loss, test_acc),
        (best_test_loss, best_test_acc),
        time.perf_counter() - t_start,
        sparse_summary,
    )
    print(f"results written to {run_dir.path}", flush=True)
