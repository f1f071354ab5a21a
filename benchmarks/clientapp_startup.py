"""ClientApp start-up benchmark: what one train message costs in a fresh process.

Why this exists: Flower's Deployment Engine starts a new ClientApp process for every
message (subprocess isolation), so nothing the ClientApp caches per process survives
between rounds. Every message pays interpreter start, imports, run-config parsing, the
node's data load, the model build and the weight transfer before its J local steps.
This script measures that split so the fixed part can be cut and watched.

What it does:

1. Writes the node data of a run-config (default ``configs/quick.toml`` with
   ``num-clients=3``, as ``python -m flower_app.data.node_data`` does) and the initial
   weights (a safetensors file) into a temp folder.
2. N times, starts a fresh Python process (``sys.executable``) that does what a
   ``flwr-clientapp`` process does for one train message: imports Flower's ClientApp
   runtime and ``flower_app.client_app``, builds the incoming Message (an ArrayRecord of
   the initial weights read from the file) and a Context (node-config with
   ``partition-id`` and ``data-dir``), calls the real ClientApp (the ``train``
   handler), and deflates the reply into the objects Flower would push. The phases
   inside the handler are timed by wrapping the functions it calls, so the handler
   runs unchanged.
3. Prints the median of every phase over N runs, the total and the fixed part (total
   minus compute). With ``--baseline DIR`` (a copy of an older tree: flower_app,
   clients, strategies) the runs of both trees alternate and both columns are shown.
   With ``--importtime K`` one extra child runs under ``python -X importtime`` and the
   K biggest imports (by package, and as pulled in by this project's modules) are
   listed.

Not measured: Flower's own per-message work around the handler (the SuperNode
spawning ``flwr-clientapp``, its HTTP calls to the SuperNode, the FAB install),
network transfer, and anything on a GPU unless the run-config asks for it.

    python benchmarks/clientapp_startup.py                        # quick preset, 5 runs
    python benchmarks/clientapp_startup.py --runs 7 --importtime 15
    python benchmarks/clientapp_startup.py --baseline /tmp/old-tree
    python benchmarks/clientapp_startup.py --threads 1       # OMP_NUM_THREADS=1 in the child
    python benchmarks/clientapp_startup.py model=vit_small_patch16_224.dino image-size=224 \\
        weights=random local-steps=1 batch-size=8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PHASES = (
    "spawn",
    "import-flwr",
    "import-app",
    "config",
    "data",
    "model",
    "weights-record",
    "weights-load",
    "compute",
    "step-1",
    "steps-rest",
    "reply-record",
    "reply-wire",
    "handler-rest",
    "other",
)
COMPUTE_PARTS = ("step-1", "steps-rest")  # inside "compute": the first step and the others
CHILD_BOOT = (
    "import time; t = time.time(); import sys; sys.path.insert(0, sys.argv[2]); "
    "import clientapp_startup as b; b.child_main(t, sys.argv[1])"
)


# ---- the child: one ClientApp message in a fresh process ----------------------------------
class PhaseClock:
    """Seconds per phase; wraps the functions the handler calls so it runs unchanged."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` adding its wall time to ``phase`` on every call."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(phase, time.perf_counter() - start)

        return timed


def _import_phases(clock: PhaseClock) -> Any:
    """Flower's ClientApp process imports, then this app's module (as ``load_app`` does)."""
    start = time.perf_counter()
    import flwr.app
    import flwr.clientapp
    import flwr.supernode.runtime.run_clientapp  # noqa: F401  (what flwr-clientapp runs)

    clock.add("import-flwr", time.perf_counter() - start)
    start = time.perf_counter()
    import flower_app.client_app as client_app

    clock.add("import-app", time.perf_counter() - start)
    return client_app


def _instrument(client_app: Any, clock: PhaseClock) -> None:
    """Time what the train handler calls, by name in the modules it looks them up in."""
    import clients.training as training
    from flower_app.config import RunConfig

    RunConfig.from_run_config = clock.wrap("config", RunConfig.from_run_config)
    client_app.load_node_data = clock.wrap("data", client_app.load_node_data)
    client_app.build_model = clock.wrap("model", client_app.build_model)
    client_app._load_weights = clock.wrap("weights-load", client_app._load_weights)
    client_app.train_local = clock.wrap("compute", client_app.train_local)
    client_app.ArrayRecord = clock.wrap("reply-record", client_app.ArrayRecord)
    step = training.sgd_step

    def timed_step(*args: Any, **kwargs: Any) -> Any:
        """The first step apart from the others: one-off work shows up in it."""
        phase = "steps-rest" if "step-1" in clock.seconds else "step-1"
        return clock.wrap(phase, step)(*args, **kwargs)

    training.sgd_step = timed_step


def _message_and_context(spec: dict[str, Any], clock: PhaseClock) -> tuple[Any, Any]:
    """The incoming train message (weights from the parent's file) and the node's Context."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from strategies import protocol

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1001, 1
    start = time.perf_counter()
    from safetensors.torch import load_file

    arrays = ArrayRecord(load_file(spec["weights"]))
    clock.add("weights-record", time.perf_counter() - start)
    config = ConfigRecord({protocol.SERVER_ROUND: 1, protocol.LR: float(spec["lr"])})
    content = RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: config})
    msg = Message(content, dst_node_id=1001, message_type=protocol.TRAIN)
    node_config = {"partition-id": spec["partition_id"], "data-dir": spec["data_dir"]}
    context = Context(
        run_id=1,
        node_id=1001,
        node_config=node_config,
        state=RecordDict(),
        run_config=spec["run_config"],
    )
    return msg, context


def child_main(started: float, spec_path: str) -> None:
    """One train message as a ``flwr-clientapp`` process handles it; prints one JSON line."""
    spec = json.loads(Path(spec_path).read_text())
    clock = PhaseClock()
    client_app = _import_phases(clock)
    _instrument(client_app, clock)
    msg, context = _message_and_context(spec, clock)
    start = time.perf_counter()
    reply = client_app.app(msg, context)
    handler = time.perf_counter() - start
    if reply.has_error():
        raise RuntimeError(f"the ClientApp replied with an error: {reply.error.reason}")
    start = time.perf_counter()
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    wire = sum(len(obj.deflate()) for obj in get_all_nested_objects(reply).values())
    clock.add("reply-wire", time.perf_counter() - start)
    inside = ("config", "data", "model", "weights-load", "compute", "reply-record")
    clock.add("handler-rest", handler - sum(clock.seconds.get(p, 0.0) for p in inside))
    out = {"started": started, "ended": time.time(), "reply-bytes": wire, **clock.seconds}
    out["code"] = str(Path(client_app.__file__).resolve().parents[1])
    print(json.dumps(out), flush=True)


# ---- the parent: node data, weights, N fresh processes, medians ----------------------------
def run_config(preset: Path, overrides: list[str]) -> dict[str, Any]:
    """pyproject defaults + preset + overrides, typed as ``flwr run --run-config`` types them."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        config = dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])
    with open(preset, "rb") as f:
        config.update(tomllib.load(f))
    for item in overrides:
        key, _, value = item.partition("=")
        try:
            config[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            config[key] = value
    return config


def prepare(config: dict[str, Any], folder: Path, partition_id: int) -> dict[str, Any]:
    """Node data for every client and the initial weights; the child's spec as a dict."""
    from safetensors.torch import save_file

    from flower_app.config import RunConfig
    from flower_app.data.node_data import write_node_data
    from flower_app.runs.runtime import initial_model

    cfg = RunConfig.from_run_config(config)
    write_node_data(cfg, folder / "nodes")
    state = {k: v.contiguous() for k, v in initial_model(cfg).state_dict().items()}
    save_file(state, str(folder / "initial.safetensors"))
    return {
        "run_config": config,
        "data_dir": str(folder / "nodes" / f"partition-{partition_id}"),
        "partition_id": partition_id,
        "weights": str(folder / "initial.safetensors"),
        "lr": cfg.lr,
    }


def run_child(
    spec_path: Path, code: Path, threads: int = 0, python_flags: tuple[str, ...] = ()
) -> dict[str, Any]:
    """One fresh process on the tree ``code``; its phases, spawn and total in seconds."""
    env = dict(os.environ, PYTHONPATH=str(code))
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    cmd = [
        sys.executable,
        *python_flags,
        "-c",
        CHILD_BOOT,
        str(spec_path),
        str(ROOT / "benchmarks"),
    ]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if Path(result["code"]) != code.resolve():
        raise RuntimeError(f"child imported flower_app from {result['code']}, not {code}")
    result["spawn"] = result["started"] - t0
    result["total"] = result["ended"] - t0
    known = sum(result.get(p, 0.0) for p in PHASES if p not in ("other", *COMPUTE_PARTS))
    result["other"] = result["total"] - known
    result["fixed"] = result["total"] - result.get("compute", 0.0)
    result["stderr"] = proc.stderr
    return result


# ---- -X importtime ----------------------------------------------------------------------
FIRST_PARTY = ("flower_app", "clients", "strategies")


def parse_importtime(stderr: str) -> list[tuple[str, int, int, str]]:
    """(module, self us, cumulative us, parent module) per ``-X importtime`` line."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        own, cumulative, name = line[len("import time:") :].split("|")
        depth = (len(name) - len(name.lstrip())) // 2
        rows.append((name.strip(), int(own), int(cumulative), depth))
    parents: dict[int, str] = {}
    out = []
    for name, own, cumulative, depth in reversed(rows):  # a parent is printed after its children
        parents[depth] = name
        out.append((name, own, cumulative, parents.get(depth - 1, "") if depth else ""))
    return out


def _is_first_party(module: str) -> bool:
    return module.split(".")[0] in FIRST_PARTY


def print_importtime(stderr: str, top: int, tree: str) -> None:
    """The biggest imports: self time per top-level package, and what our modules pull in."""
    rows = parse_importtime(stderr)
    packages: dict[str, int] = {}
    for name, own, _, _ in rows:
        packages[name.split(".")[0]] = packages.get(name.split(".")[0], 0) + own
    print(f"\n{tree}: -X importtime, one child: self time by top-level package (top {top})")
    for package, us in sorted(packages.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {us / 1e6:6.2f} s  {package}")
    pulled = [r for r in rows if _is_first_party(r[3]) and not _is_first_party(r[0])]
    print(f"imports made by this project's modules, cumulative (top {top})")
    for name, _, cumulative, parent in sorted(pulled, key=lambda r: -r[2])[:top]:
        print(f"  {cumulative / 1e6:6.2f} s  {name:<45} <- {parent}")


# ---- report -------------------------------------------------------------------------------
def medians(results: list[dict[str, Any]]) -> dict[str, float]:
    """Median per phase: a shared machine makes single runs swing by tens of percent."""
    keys = (*PHASES, "total", "fixed")
    return {k: statistics.median(r.get(k, 0.0) for r in results) for k in keys}


def print_table(columns: dict[str, list[dict[str, Any]]]) -> None:
    """Median seconds per phase, one column per tree, plus the after/before ratio."""
    names = list(columns)
    meds = {name: medians(runs) for name, runs in columns.items()}
    head = "".join(f"{n:>12}" for n in names)
    ratio = len(names) == 2
    print(f"\n{'phase (median s)':<18}{head}{'  ratio' if ratio else ''}")
    for key in (*PHASES, "total", "fixed"):
        cells = "".join(f"{meds[n][key]:12.3f}" for n in names)
        extra = ""
        if ratio and meds[names[0]][key] > 0.005:
            extra = f"  {meds[names[1]][key] / meds[names[0]][key]:5.2f}"
        print(f"{key:<18}{cells}{extra}")
    for name, runs in columns.items():
        totals = ", ".join(f"{r['total']:.2f}" for r in runs)
        print(f"{name}: totals per run [{totals}] s; reply {runs[0]['reply-bytes']} bytes")


def load_average() -> str:
    """The 1/5/15-minute load, printed with the numbers because they depend on it."""
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    """Prepare once, then alternate fresh processes of each tree; print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per tree")
    parser.add_argument("--run-config", type=Path, default=ROOT / "configs" / "quick.toml")
    parser.add_argument("--partition-id", type=int, default=0)
    parser.add_argument("--baseline", type=Path, help="an older tree to alternate with")
    parser.add_argument("--importtime", type=int, default=0, metavar="K", help="list K imports")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the child")
    parser.add_argument("overrides", nargs="*", help="key=value run-config overrides")
    args = parser.parse_args(argv)
    config = run_config(args.run_config, ["num-clients=3", *args.overrides])
    trees = {"current": ROOT}
    if args.baseline:
        trees = {"baseline": args.baseline.resolve(), "current": ROOT}
    with tempfile.TemporaryDirectory(prefix="clientapp-startup-") as tmp:
        spec = prepare(config, Path(tmp), args.partition_id)
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        threads = args.threads or "default"
        print(f"{os.cpu_count()} cores, child threads {threads}; {load_average()} (start)")
        columns: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
        for _ in range(args.runs):
            for name, code in trees.items():
                columns[name].append(run_child(spec_path, code, args.threads))
        print(f"{load_average()} (end)")
        print_table(columns)
        for name, code in trees.items() if args.importtime else ():
            traced = run_child(spec_path, code, args.threads, ("-X", "importtime"))
            print_importtime(traced["stderr"], args.importtime, name)


if __name__ == "__main__":
    main()
