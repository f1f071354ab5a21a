"""Round-time benchmark: the real app through ``flwr run``, against the compute floor.

The command line: arguments, device and federation, then floors, runs and report in order.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.round.floors import floor_of_round
from benchmarks.round.forms import GPU_FORM, PAYLOAD_FORM, TINY_FORM
from benchmarks.round.report import print_memory_by_k, report_run, write_benchmark_json
from benchmarks.round.runs import prune_model_files, run_all, run_specs
from flower_app.cli.run import GPU_SHARE
from flower_app.config import RunConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--tiny", action="store_true", help="the CPU form: tiny ViT at 32 px (default without GPU)"
    )
    parser.add_argument(
        "--payload",
        action="store_true",
        help="ViT-S/16 weights at 32 px, J=1, batch 1: the cost of carrying the model",
    )
    parser.add_argument(
        "--weights-transport",
        default="",
        help="run-config weights-transport of the runs (default: the app's, auto); several, "
        "comma-separated, run one after the other",
    )
    parser.add_argument("--rounds", type=int, default=10, help="measured rounds per run")
    parser.add_argument("--warmup", type=int, default=1, help="rounds dropped before measuring")
    parser.add_argument("--skip-k1000", action="store_true", help="no K=1000 memory run")
    parser.add_argument("--k1000-rounds", type=int, default=0, help="default: --rounds")
    parser.add_argument(
        "--federation-config",
        default="",
        help="client resources (default: fl-run's, num-cpus=1, and num-gpus=0.5 on a GPU)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="run-config compile=true for the runs"
    )
    parser.add_argument("--no-floor-compile", action="store_true", help="eager floor on a GPU")
    parser.add_argument(
        "--task-metrics",
        type=int,
        default=0,
        metavar="N",
        help="run-config task-metrics-examples=N (every round) for the dense and sparse runs: "
        "prints the task-arithmetic measurement's share of the round (default 0: off)",
    )
    parser.add_argument("--output-dir", type=Path, default=None, help="default: a temp folder")
    parser.add_argument(
        "--keep-models",
        action="store_true",
        help="keep the runs' model files (checkpoint, weights, mask); by default they are "
        "deleted once the runs are read (about 1 GB for the payload form)",
    )
    parser.add_argument("--run-timeout", type=float, default=1800.0)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be >= 1 and --warmup >= 0")
    if args.task_metrics < 0:
        parser.error("--task-metrics must be >= 0 (0: off)")
    return args


def pick_device(choice: str) -> torch.device | None:
    """The device of ``--device``; None for ``cuda`` on a machine without a GPU."""
    cuda = torch.cuda.is_available()
    if choice == "cuda" and not cuda:
        return None
    return torch.device("cuda" if choice != "cpu" and cuda else "cpu")


def default_federation(device: torch.device) -> str:
    """Client resources as fl-run picks them: one CPU per client worker, two per GPU."""
    if device.type == "cpu":
        return "client-resources-num-cpus=1"
    return f"client-resources-num-cpus=1 client-resources-num-gpus={GPU_SHARE}"


def print_setup(
    device: torch.device, tiny: bool, args: argparse.Namespace, cfg: RunConfig, federation: str
) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    form = "payload" if args.payload else "tiny (CPU)" if tiny else "canonical (GPU)"
    print(
        f"device: {device.type} ({name}), {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}; form: {form}; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    if device.type == "cpu" and not args.tiny and not args.payload:
        print("no GPU: running the tiny CPU form (vit_tiny_test, 32 px)", flush=True)
    print(
        f"setup: {cfg.model} at {cfg.image_size} px, K={cfg.num_clients}, C={cfg.fraction_train}, "
        f"J={cfg.local_steps}, batch {cfg.batch_size}; federation: {federation}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    """Floor, dense and sparse runs (and K=1000); exit 1 if a run failed."""
    args = parse_args(argv)
    device = pick_device(args.device)
    if device is None:
        print("error: --device cuda but this machine sees no GPU", file=sys.stderr)
        return 2
    tiny = not args.payload and (args.tiny or device.type == "cpu")
    form = PAYLOAD_FORM if args.payload else TINY_FORM if tiny else GPU_FORM
    form = form | {"device": device.type, "compile": args.compile}
    if args.task_metrics:
        form |= {"task-metrics-examples": args.task_metrics, "task-metrics-every": 1}
    federation = args.federation_config or default_federation(device)
    cfg = RunConfig.from_run_config(form)
    print_setup(device, tiny, args, cfg, federation)

    out = args.output_dir or Path(tempfile.mkdtemp(prefix="round-benchmark-"))
    out = out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    specs = run_specs(args, form, federation, device, tiny)
    try:
        results = run_all(specs, out, args.run_timeout)
    finally:  # also when a run fails or the benchmark is interrupted
        if not args.keep_models:
            freed = prune_model_files(out, [spec.name for spec in specs])
            mb = freed / 2**20
            print(f"deleted the runs' model files ({mb:.0f} MB; --keep-models keeps them)")

    # measured right after the runs, in this process, with the runs' processes gone
    compile_floor = device.type == "cuda" and not args.no_floor_compile and not args.payload
    batch_sizes = [cfg.batch_size] if args.payload else [64, 128, 256]
    floor = floor_of_round(cfg, device, federation, compile_floor, batch_sizes)
    report = [report_run(r, floor, lambda line: print(line, flush=True)) for r in results]
    print_memory_by_k(report)
    write_benchmark_json(out, device, floor, report)
    print(f"\nresults: {out} (benchmark.json, one folder per run)")
    failed = [r.spec.name for r in results if not r.ok]
    if failed:
        print(f"FAILED runs: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
