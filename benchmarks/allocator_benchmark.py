"""Client steps with glibc's default thresholds against ``keep_freed_memory``.

Why this exists: a client builds a fresh optimizer for every message, so each step
allocates momentum buffers and weight-decay temporaries anew; with glibc's defaults
those pages go back to the kernel after every message and are faulted in and zeroed
again by the next (``flower_app/perf/allocator.py``). This script shows what that costs.

What it does: pairs of fresh child processes (``sys.executable``), one with glibc's
defaults and one that calls ``keep_freed_memory()`` first, alternating. Each builds the
model of the payload form (ViT-S/16 at 32 px by default), warms up, then times
``--clients`` clients one after the other as a client worker runs them: a fresh
SGD-momentum optimizer and ``--steps`` steps of ``clients.training.train_local`` each,
with one torch thread (one client worker), counting minor page faults. The step is
``round_benchmark.py``'s bare client compute (the app's ``train_local``, the payload
form's learning rate, momentum and weight decay). Prints the median client time and
faults per client of each setting and their ratio.

    python benchmarks/allocator_benchmark.py                  # ViT-S/16 at 32 px, batch 1
    python benchmarks/allocator_benchmark.py --steps 4 --batch 8  # more compute per client
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(model_name: str, keep: bool, clients: int, steps: int, batch: int) -> dict:
    """Runs in a fresh process: seconds and minor faults of each client, one thread."""
    sys.path[:0] = [str(ROOT)]
    from flower_app.perf.allocator import keep_freed_memory

    kept = keep_freed_memory() if keep else False
    import torch

    from benchmarks.round.floors import _timed_train
    from benchmarks.round.forms import PAYLOAD_FORM
    from flower_app.config import RunConfig
    from flower_app.models.factory import build_model

    torch.set_num_threads(1)
    overrides = {"device": "cpu", "model": model_name, "local-steps": steps, "batch-size": batch}
    cfg = RunConfig.from_run_config(PAYLOAD_FORM | overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.num_classes, cfg.image_size)
    g = torch.Generator().manual_seed(0)
    shape = (4 * batch, 3, cfg.image_size, cfg.image_size)
    data = (
        torch.randint(0, 256, shape, dtype=torch.uint8, generator=g),
        torch.randint(0, cfg.num_classes, (4 * batch,), generator=g),
    )

    def one_client(seed: int) -> tuple[float, int]:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        seconds = _timed_train(model, data, steps, batch, cfg, torch.device("cpu"), seed)
        return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    for seed in range(2):  # warm-up: first touch of the model, its gradients, the kernels
        one_client(seed)
    runs = [one_client(10 + c) for c in range(clients)]
    return {"kept": kept, "seconds": [s for s, _ in runs], "faults": [f for _, f in runs]}


def run_child(args: argparse.Namespace, keep: bool) -> dict:
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); "
        "from benchmarks.allocator_benchmark import child; "
        "print(json.dumps(child(sys.argv[2], sys.argv[3] == '1', int(sys.argv[4]), "
        "int(sys.argv[5]), int(sys.argv[6]))))"
    )
    argv = [args.model, "1" if keep else "0", args.clients, args.steps, args.batch]
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), *map(str, argv)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224.dino")
    parser.add_argument("--clients", type=int, default=10, help="clients timed per child")
    parser.add_argument("--steps", type=int, default=1, help="local steps per client (J)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=3, help="default/kept child pairs")
    args = parser.parse_args(argv)
    seconds: dict[str, list[float]] = {"default": [], "kept": []}
    faults: dict[str, list[int]] = {"default": [], "kept": []}
    applied = False
    for pair in range(args.pairs):
        for name, keep in (("default", False), ("kept", True)):
            result = run_child(args, keep)
            applied = applied or result["kept"]
            seconds[name] += result["seconds"]
            faults[name] += result["faults"]
            print(
                f"pair {pair + 1} {name:7s}: median client "
                f"{statistics.median(result['seconds']) * 1e3:7.1f} ms, "
                f"{statistics.median(result['faults']):8.0f} page faults per client",
                flush=True,
            )
    if not applied:
        print("glibc not found: keep_freed_memory changes nothing on this system")
    default, kept = (statistics.median(seconds[k]) for k in ("default", "kept"))
    print(
        f"{args.model}, J={args.steps}, batch {args.batch}, one thread: median client "
        f"{default * 1e3:.1f} ms with glibc's defaults, {kept * 1e3:.1f} ms with freed memory "
        f"kept ({kept / default:.2f}x); page faults per client "
        f"{statistics.median(faults['default']):.0f} -> {statistics.median(faults['kept']):.0f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
