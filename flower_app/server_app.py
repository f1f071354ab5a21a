"""ServerApp: prepare (config, data, model, nodes, components), run the plan, finish.

``main`` reads as those three steps. Preparing validates everything before heavy work
and builds the run's components: the round clock, the strategy and the hooks declared
in ``round_hooks``. Running is the strategy's loop over the clock. Finishing tests the
final and the best model, writes the weights and ``summary.json`` and ends the tracker
run (``runs/tracking.py``, off unless the run-config's ``tracking`` names one).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid

from flower_app.config import (
    ConfigError,
    RunConfig,
    explain_insufficient_replies,
    overrides_text,
)
from flower_app.data.sources import ImageSplit
from flower_app.perf.allocator import keep_freed_memory
from flower_app.runs.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    Checkpointer,
    Saveable,
    check_identity,
    load_checkpoint,
    restore,
)
from flower_app.runs.hooks import (
    BestModel,
    CentralEvaluation,
    MetricsTable,
    PlacementTable,
    ProgressLog,
    Stopwatch,
    calibration_table,
)
from flower_app.runs.prerequisites import check_prerequisites, missing_checkpoint_message
from flower_app.runs.results import (
    RunDirectory,
    finish_run,
    partitions_figure,
    partitions_frame,
    result_line,
    save_figure,
)
from flower_app.runs.run_lock import RunFolderLocked, holder_record, holding
from flower_app.runs.runtime import (
    ModelEvaluator,
    initial_model,
    resolve_device,
    run_splits,
    to_device,
)
from flower_app.runs.schedule import lr_at_round
from flower_app.runs.strategy_registry import STRATEGIES
from flower_app.runs.task_metrics import (
    TaskInterference,
    TaskRounds,
    label_shares,
    stratified_subset,
)
from flower_app.runs.tracking import Tracker, make_tracker
from strategies import protocol
from strategies.fedavg import OrderedFedAvg
from strategies.plan import RoundClock
from strategies.rounds import (
    InsufficientRepliesError,
    RetryPolicy,
    RoundHook,
    client_error_text,
    run_plan,
)
from strategies.seeds import derive_seed
from strategies.server_rules import build_rule
from strategies.transport.carrier import WeightCarrier
from strategies.transport.grid import CarryingGrid
from strategies.transport.selection import TransportUnavailable, open_carrier, report_probes

app = ServerApp()

NODE_COUNT_SETTLE_S = 5.0  # simulation registers all nodes at once; a stable count is final


class FederationMismatchError(RuntimeError):
    """The federation does not have ``num-clients`` nodes."""


def wait_for_nodes(grid: Grid, expected: int, timeout: float, overrides: str = "") -> list[int]:
    """Node ids once exactly ``expected`` are connected; fail fast on any other stable count.

    ``overrides`` (the run-config pairs that differ from the defaults) goes into the
    suggested command, so copying it reruns the user's experiment, not the canonical one.
    """
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
            run_config = f'--run-config "{overrides}" ' if overrides else ""
            raise FederationMismatchError(
                f"run-config num-clients={expected} but the federation has {len(nodes)} "
                f"SuperNodes; in simulation run: flwr run . {run_config}--federation-config "
                f'"num-supernodes={expected}" (or set num-clients={len(nodes)}); in deployment '
                f"start {expected} SuperNodes before flwr run"
            )
        time.sleep(0.2)


def query_partitions(
    grid: Grid, node_ids: list[int], timeout: float
) -> tuple[list[dict], list[Message]]:
    """Ask every node which shard it holds (loads data and partition on each worker once);
    the run's Grid adds the shared folder's probe to each query."""
    messages = [
        Message(RecordDict(), dst_node_id=nid, message_type=protocol.QUERY_PARTITION)
        for nid in node_ids
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    failed = [client_error_text(r.error.reason) for r in replies if r.has_error()]
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
    return out, replies


def plan_for(cfg: RunConfig) -> RoundClock:
    """The run's phases, as the strategy's registry entry lays them out."""
    return RoundClock(STRATEGIES[cfg.strategy].phases(cfg))


def build_strategy(
    cfg: RunConfig,
    model: torch.nn.Module,
    partition_to_node: dict[int, int],
    clock: RoundClock,
    shard_sizes: dict[int, int] | None = None,
) -> OrderedFedAvg:
    """The strategy the run-config's ``strategy`` names (its registry entry), on the
    run's clock.

    ``shard_sizes`` (examples per partition, from the partition query) is the only
    ``num-examples`` a reply may claim; replies are checked against it.
    """
    common = {
        "partition_to_node": partition_to_node,
        "shard_sizes": shard_sizes,
        "clients_per_round": cfg.clients_per_round,
        "seed": cfg.seed,
        "clock": clock,
        "lr_at": functools.partial(lr_at_round, cfg=cfg),
        "retry": RetryPolicy(cfg.min_train_clients, cfg.max_round_retries, cfg.round_timeout),
        "update_metrics": cfg.update_metrics,
        "server_rule": build_rule(cfg.server_rule, cfg.server_rule_values()),
        "task_rounds": TaskRounds(cfg.task_metrics_every) if cfg.task_metrics_examples else None,
    }
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return STRATEGIES[cfg.strategy].build(cfg, shapes, common)


def writable_output_dir(output_dir: str) -> Path:
    """The absolute output folder, created if needed (its writability was checked with the
    other prerequisites, ``check_prerequisites``); a failing mkdir is a one-line error."""
    path = Path(os.path.expanduser(output_dir)).resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"run-config key 'output-dir' = {output_dir!r} is not allowed: cannot write to "
            f"{path} ({exc.strerror or exc})"
        ) from exc
    return path


def open_checkpoint(cfg: RunConfig, run_path: Path) -> Checkpoint:
    """The checkpoint ``resume=true`` continues from, checked against this run-config."""
    path = run_path / CHECKPOINT_NAME
    if not path.is_file():
        raise ConfigError(missing_checkpoint_message(path))
    checkpoint = load_checkpoint(path)
    check_identity(checkpoint.identity, cfg.experiment_identity(), path)
    return checkpoint


@dataclass
class Components:
    """The stateful parts of a run: each saves and loads itself, the checkpoint collects them."""

    clock: RoundClock
    strategy: OrderedFedAvg
    metrics: MetricsTable
    calibration: MetricsTable
    best: BestModel
    stopwatch: Stopwatch
    tracker: Tracker
    placement: PlacementTable

    def saveables(self) -> dict[str, Saveable]:
        return dict(vars(self))


def round_hooks(
    components: Components,
    evaluate_val: Callable[[ArrayRecord], tuple[float, float]] | None,
    cfg: RunConfig,
    run_dir: RunDirectory,
    initial_state: dict[str, torch.Tensor],
    task_metrics: RoundHook | None = None,
) -> list[RoundHook]:
    """What runs after every round, in this order (each hook sees what earlier ones added).

    Without a validation split (``val-fraction = 0``) nothing is evaluated during the run;
    ``task_metrics`` (task-arithmetic interference) runs where ``task-metrics-examples`` > 0.
    """
    c = components
    evaluation = [] if evaluate_val is None else [CentralEvaluation(evaluate_val, cfg.eval_every)]
    return [
        *evaluation,
        *([] if task_metrics is None else [task_metrics]),
        c.stopwatch,  # the round's seconds include its evaluation and task metrics
        c.best,
        c.metrics,
        c.calibration,
        c.placement,
        c.tracker,  # after the tables: it logs their rows
        ProgressLog(c.clock, c.stopwatch.total, write=lambda line: print(line, flush=True)),
        # last: it saves what the hooks before it recorded
        Checkpointer(
            run_dir.path / CHECKPOINT_NAME,
            cfg.checkpoint_every,
            cfg.experiment_identity(),
            initial_state,
            c.clock,
            c.saveables(),
        ),
    ]


@dataclass
class PreparedRun:
    """Everything ``main`` needs after preparing: what to run and where results go."""

    cfg: RunConfig
    run_name: str
    run_dir: RunDirectory
    components: Components
    hooks: list[RoundHook]
    start: ArrayRecord
    initial_state: dict[str, torch.Tensor]
    evaluator: ModelEvaluator
    test: ImageSplit


def resolved_config(cfg: RunConfig, run_path: Path) -> dict:
    """The run-config as ``config.json`` holds it (and the tracker run's config)."""
    return cfg.to_dict() | {"run-name": run_path.name}


def open_run_dir(cfg: RunConfig, run_path: Path, resumed: bool) -> RunDirectory:
    """The run directory (made and locked by ``run_folder``), with ``config.json`` when
    the run is fresh."""
    run_dir = RunDirectory(run_path)
    if not resumed:
        run_dir.write_json("config.json", resolved_config(cfg, run_path))
    return run_dir


def stop_command(grid: Grid, run_id: int) -> str:
    """How another user stops this run: Flower's ``flwr stop``, or for a ServerApp run in
    a process of its own (the in-process engine), an interrupt of that process."""
    if not type(grid).__module__.startswith("flwr."):
        return f"kill -INT {os.getpid()}"
    try:
        from flower_app.cli.local_superlink import flower_executable

        return f"{flower_executable('flwr')} stop {run_id}"
    except FileNotFoundError:
        return f"flwr stop {run_id}"


@contextmanager
def run_folder(cfg: RunConfig, run_path: Path, holder: dict) -> Iterator[None]:
    """The run folder, held for the block (``runs/run_lock.py``: one writer per folder).

    A fresh run makes it (an existing one is refused in one line); a resumed run takes
    the existing one. A fresh folder that holds nothing when the run ends (it failed
    before writing a file) is removed again.
    """
    if not cfg.resume:
        RunDirectory.create(run_path.parent, run_path.name)  # raises the one-line error
    elif not run_path.is_dir():
        raise ConfigError(missing_checkpoint_message(run_path / CHECKPOINT_NAME))
    try:
        with holding(run_path, holder, log=lambda line: print(line, flush=True)):
            yield
    except RunFolderLocked as exc:
        raise ConfigError(str(exc)) from None
    finally:
        if not cfg.resume and run_path.is_dir() and not any(run_path.iterdir()):
            run_path.rmdir()


def finished_already(checkpoint: Checkpoint | None, clock: RoundClock, run_path: Path) -> bool:
    """A resume of a run that finished (last round checkpointed, summary written): one line."""
    if checkpoint is None or checkpoint.completed_rounds < clock.total_rounds:
        return False
    if not (run_path / "summary.json").is_file():
        return False  # it stopped while finishing: finish again
    print(
        f"run {run_path.name} finished already ({clock.total_rounds} rounds, "
        f"results in {run_path}); nothing to do",
        flush=True,
    )
    return True


def build_components(
    cfg: RunConfig,
    model: torch.nn.Module,
    partitions: list[dict],
    clock: RoundClock,
    run_dir: RunDirectory,
    stopwatch: Stopwatch,
    tracker: Tracker,
) -> Components:
    to_node = {int(p[protocol.PARTITION_ID]): p["node-id"] for p in partitions}
    sizes = {int(p[protocol.PARTITION_ID]): int(p[protocol.NUM_EXAMPLES]) for p in partitions}
    return Components(
        clock,
        build_strategy(cfg, model, to_node, clock, sizes),
        MetricsTable(run_dir),
        calibration_table(run_dir),
        BestModel(),
        stopwatch,
        tracker,
        PlacementTable(run_dir),
    )


def resume_from(checkpoint: Checkpoint, components: Components, run_path: Path) -> ArrayRecord:
    """Every component loads its own state; the run continues from the saved weights."""
    restore(checkpoint, components.saveables(), run_path / CHECKPOINT_NAME)
    clock = components.clock
    print(f"resuming after round {clock.completed} of {clock.total_rounds}", flush=True)
    return ArrayRecord(checkpoint.arrays)


def prepare(
    grid: Grid, cfg: RunConfig, run_path: Path, carrier: WeightCarrier, tracker: Tracker
) -> PreparedRun | None:
    """Check, load and build everything; None when a resumed run had finished already."""
    stopwatch, clock = Stopwatch(), plan_for(cfg)
    checkpoint = open_checkpoint(cfg, run_path) if cfg.resume else None
    if finished_already(checkpoint, clock, run_path):
        return None
    print(f"waiting for {cfg.num_clients} SuperNodes ...", flush=True)
    overrides = overrides_text(cfg.to_dict())
    node_ids = wait_for_nodes(grid, cfg.num_clients, cfg.node_wait_timeout, overrides)
    device = resolve_device(cfg.device)
    print(f"loading {cfg.dataset} and the initial {cfg.model} weights ...", flush=True)
    splits = run_splits(cfg)
    check_shards(cfg, splits.train.labels.numpy())
    model = initial_model(cfg)
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if checkpoint is not None:
        initial_state = checkpoint.initial
    print(f"asking the {len(node_ids)} nodes for their shards ...", flush=True)
    partitions, _ = query_partitions(grid, node_ids, cfg.round_timeout)
    with transport_errors_as_config_errors():
        report_probes(carrier, node_ids, cfg.weights_transport)
    run_dir = open_run_dir(cfg, run_path, checkpoint is not None)
    shards = partitions_frame(partitions)
    run_dir.write_csv("partitions.csv", shards)
    picture = partitions_figure(shards, cfg.num_classes, shards_title(cfg))
    save_figure(picture, run_dir.path / "partitions.png")
    print(f"run directory: {run_dir.path}; plan: {clock.describe()} rounds", flush=True)
    components = build_components(cfg, model, partitions, clock, run_dir, stopwatch, tracker)
    evaluator = ModelEvaluator(model, cfg, device)
    val, test = to_device(splits.val, device), to_device(splits.test, device)
    evaluate_val = None
    if len(val.labels):
        evaluate_val = lambda arrays: evaluator(arrays.to_torch_state_dict(), val)  # noqa: E731
    task_metrics = task_metrics_hook(cfg, evaluator, val, partitions)
    hooks = round_hooks(components, evaluate_val, cfg, run_dir, initial_state, task_metrics)
    start = ArrayRecord(initial_state)
    if checkpoint is not None:
        start = resume_from(checkpoint, components, run_path)
    return PreparedRun(
        cfg, run_path.name, run_dir, components, hooks, start, initial_state, evaluator, test
    )


def task_metrics_hook(
    cfg: RunConfig, evaluator: ModelEvaluator, val: ImageSplit, partitions: list[dict]
) -> TaskInterference | None:
    """The task-arithmetic hook on a seeded, class-stratified subset of the server's own
    validation split (``task-metrics-examples`` of it at most), None when off."""
    if not cfg.task_metrics_examples:
        return None
    seed = derive_seed(cfg.seed, "task-metrics-subset")
    chosen = stratified_subset(val.labels, cfg.task_metrics_examples, cfg.num_classes, seed)
    subset = ImageSplit(val.images[chosen.to(val.images.device)], val.labels.cpu()[chosen])
    shares = label_shares(partitions, cfg.num_classes)
    reuse = cfg.task_metrics_every == 1  # each round's w is the last measured w + t
    return TaskInterference(evaluator.predictions, subset, shares, cfg.num_classes, reuse)


def finish(run: PreparedRun, final: ArrayRecord) -> None:
    """Test the final and the best model; write weights, plot and ``summary.json``."""
    c, cfg = run.components, run.cfg
    print("testing the final and the best-validation model ...", flush=True)
    extra_summary: dict = {"total-rounds": c.clock.total_rounds, "segments": c.stopwatch.segments}
    extra_weights = {}
    calibration = c.calibration.frame()
    if len(calibration):  # the summary's bytes count every round of every phase
        metrics = c.metrics.frame()
        extra_summary |= {
            key: float(metrics[key].sum() + calibration[key].sum())
            for key in ("bytes-down", "bytes-up")
        }
    strategy_summary, strategy_files = c.strategy.outputs()
    extra_summary |= strategy_summary
    extra_weights |= strategy_files
    summary = finish_run(
        run.run_dir,
        run.run_name,
        metrics=c.metrics.frame(),
        rounds=cfg.num_server_rounds,
        final_state=final.to_torch_state_dict(),
        initial_state=run.initial_state,
        best_state=c.best.state,
        best_accuracy=c.best.accuracy if c.best.state is not None else None,
        best_round=c.best.round if c.best.state is not None else None,
        test=lambda state: run.evaluator(state, run.test),
        wall_time_s=c.stopwatch.total(),
        model=cfg.model,
        num_classes=cfg.num_classes,
        extra_summary=extra_summary,
        extra_weights=extra_weights,
        final_round=c.clock.total_rounds,
        title=cfg.title(run.run_name),
    )
    c.tracker.finish(summary)
    print(f"{result_line(summary)}; results in {run.run_dir.path}", flush=True)


SIMULATION_POLL_S = 0.01  # Flower's InMemoryGrid looks for replies every 0.1 s


def poll_quickly(grid: Grid) -> None:
    """In a simulation, look for replies every ``SIMULATION_POLL_S``: with Flower's longer
    default pause between looks the ServerApp sat idle after the last reply of every
    round (a look is a dictionary scan under a lock; deployment is not changed)."""
    if isinstance(grid, InMemoryGrid):
        grid.pull_interval = min(grid.pull_interval, SIMULATION_POLL_S)


def check_shards(cfg: RunConfig, labels: np.ndarray) -> None:
    """Dirichlet shards are drawn at random: whether every client gets its
    ``dirichlet-min-size`` is known only after the draw, so the ServerApp draws them once,
    as every node will, and refuses the run in one line before the nodes load anything."""
    if cfg.sharding != "dirichlet":
        return
    from flower_app.data.partitioners import partition_indices

    try:
        partition_indices(
            labels,
            cfg.num_clients,
            cfg.sharding,
            cfg.classes_per_client,
            cfg.seed,
            **cfg.shard_options,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def shards_title(cfg: RunConfig) -> str:
    """What the partition picture shows, in the run-config's words."""
    detail = {
        "iid": "",
        "non-iid": f", classes-per-client={cfg.classes_per_client}",
        "dirichlet": f", dirichlet-alpha={cfg.dirichlet_alpha:g}",
    }[cfg.sharding]
    return f"sharding={cfg.sharding}{detail}, num-clients={cfg.num_clients}, seed={cfg.seed}"


@contextmanager
def transport_errors_as_config_errors() -> Iterator[None]:
    """The transport's refusal of ``shared-memory`` is a run-config error (one line)."""
    try:
        yield
    except TransportUnavailable as exc:
        raise ConfigError(str(exc)) from exc


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Prepare, run the plan of rounds, finish."""
    poll_quickly(grid)
    keep_freed_memory()  # a new global model every round: its pages stay in the heap
    cfg = RunConfig.from_run_config(dict(context.run_config))
    check_prerequisites(cfg)  # output folder, data, weights: every missing piece at once
    output_dir = writable_output_dir(cfg.output_dir)
    run_path = output_dir / cfg.resolved_run_name(time.strftime("%Y%m%d-%H%M%S"))
    tracker = make_tracker(cfg, run_path)  # a missing extra: one line, before any work
    holder = holder_record(context.run_id, stop_command(grid, context.run_id))
    with closing(tracker), run_folder(cfg, run_path, holder):  # a failed run ends both
        with transport_errors_as_config_errors():
            carrier = open_carrier(cfg.weights_transport, context.run_id)
        grid = CarryingGrid(grid, carrier)  # weights by reference, out of the strategy's sight
        try:
            run = prepare(grid, cfg, run_path, carrier, tracker)
            if run is None:
                return
            tracker.start(resolved_config(cfg, run_path))
            try:
                components = run.components
                final = run_plan(
                    components.strategy,
                    components.clock,
                    grid,
                    run.start,
                    run.hooks,
                    cfg.node_wait_timeout,
                )
            except InsufficientRepliesError as exc:
                message = explain_insufficient_replies(str(exc), cfg)
                raise InsufficientRepliesError(message) from exc
        finally:
            carrier.close()  # no file of the run outlives it (a killed run's: the next start)
        finish(run, final)
