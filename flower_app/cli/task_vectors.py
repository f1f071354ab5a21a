"""``fl-task-vectors``: task addition, negation and evaluation of finished runs.

``fl-task-vectors add RUN_DIR RUN_DIR ... [--alpha auto|X]``: w0 + alpha * sum of the runs'
backbone task vectors, each task tested with its own head on its own classes.
``fl-task-vectors negate RUN_DIR --control RUN_DIR [--alpha auto|X]``: w0 - alpha * tau.
``fl-task-vectors evaluate RUN_DIR``: the pretrained backbone with the run's head against
the run's fine-tuned model. ``auto`` picks alpha on the validation splits
(``flower_app.runs.task_arithmetic``); numbers are test accuracies. Exit 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flower_app.config import ConfigError
from flower_app.runs.task_arithmetic import add_tasks, negate_task
from flower_app.runs.task_runs import TaskRun, TaskVectorMismatch, check_compatible, load_task_run


def parse_alpha(text: str) -> float | None:
    """``auto`` (None) or a finite number."""
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"--alpha {text!r}: must be auto or a number")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fl-task-vectors", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="task addition of two or more runs")
    add.add_argument("runs", nargs="+", type=Path)
    add.add_argument("--alpha", type=parse_alpha, default=None, help="auto (default) or X")
    neg = sub.add_parser("negate", help="task negation of one run, with a control run")
    neg.add_argument("run", type=Path)
    neg.add_argument("--control", type=Path, required=True)
    neg.add_argument("--alpha", type=parse_alpha, default=None, help="auto (default) or X")
    ev = sub.add_parser("evaluate", help="a run's pretrained and fine-tuned test accuracy")
    ev.add_argument("run", type=Path)
    return parser.parse_args(argv)


def _load(paths: list[Path], device: str) -> list[TaskRun]:
    for path in paths:
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a run directory")
    runs = [load_task_run(p, device) for p in paths]
    check_compatible(runs)
    return runs


def _add(args: argparse.Namespace) -> list[str]:
    if len(args.runs) < 2:
        raise ValueError(f"add needs two or more run directories, got {len(args.runs)}")
    runs = _load(args.runs, args.device)
    result = add_tasks([r.task for r in runs], args.alpha)
    lines = [f"task addition, alpha {result.alpha:g} ({'auto' if args.alpha is None else 'given'})"]
    lines.append(
        f"{'task':<32} {'pretrained':>10} {'fine-tuned':>10} {'added':>8} {'normalized':>10}"
    )
    for name, s in result.tasks.items():
        row = f"{name:<32} {s.pretrained:>10.4f} {s.fine_tuned:>10.4f} {s.edited:>8.4f}"
        lines.append(f"{row} {s.normalized:>10.4f}")
    lines.append(
        f"{'mean':<32} {'':>10} {'':>10} {result.absolute:>8.4f} {result.normalized:>10.4f}"
    )
    return lines


def _negate(args: argparse.Namespace) -> list[str]:
    target, control = _load([args.run, args.control], args.device)
    result = negate_task(target.task, control.task, args.alpha)
    how = "auto: control >= 0.95 x pretrained" if args.alpha is None else "given"
    lines = [f"task negation, alpha {result.alpha:g} ({how})"]
    lines.append(f"{'role':<8} {'task':<32} {'pretrained':>10} {'fine-tuned':>10} {'negated':>8}")
    for role, run, s in (("target", target, result.target), ("control", control, result.control)):
        row = f"{role:<8} {run.task.name:<32} {s.pretrained:>10.4f} {s.fine_tuned:>10.4f}"
        lines.append(f"{row} {s.edited:>8.4f}")
    return lines


def _evaluate(args: argparse.Namespace) -> list[str]:
    (run,) = _load([args.run], args.device)
    task = run.task
    pretrained = task.reference("pretrained", "test")
    fine_tuned = task.reference("fine_tuned", "test")
    classes = run.config.task_classes or f"all {run.config.num_classes}"
    return [
        f"{task.name}: classes {classes}, test accuracy",
        f"  pretrained backbone + own head  {pretrained:.4f}",
        f"  fine-tuned (w0 + tau)           {fine_tuned:.4f}",
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = {"add": _add, "negate": _negate, "evaluate": _evaluate}[args.command]
    try:
        lines = work(args)
    except (TaskVectorMismatch, ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
