"""Write each SuperNode's own training data, for deployments (and the deployment test).

``python -m flower_app.data.node_data --out DIR [--run-config FILE] [key=value ...]`` loads
the data set that the run-config names, takes its training split (validation carved
out as in a run), partitions it as the run-config says and writes
``DIR/partition-<i>/node-data.npz`` for every client i. Start SuperNode i with
``--node-config "partition-id=<i> num-partitions=<K> data-dir=DIR/partition-<i>"``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flower_app.config import RunConfig, load_preset, parse_pairs
from flower_app.data.partitioners import partition_indices
from flower_app.data.sources import ImageSplit, save_node_data
from flower_app.runs.runtime import run_splits


def write_node_data(cfg: RunConfig, out: Path) -> list[Path]:
    """One ``node-data.npz`` per partition under ``out``."""
    splits = run_splits(cfg)
    train = splits.train
    parts = partition_indices(
        train.labels.numpy(),
        cfg.num_clients,
        cfg.sharding,
        cfg.classes_per_client,
        cfg.seed,
        **cfg.shard_options,
    )
    paths = []
    for pid, idx in enumerate(parts):
        shard = ImageSplit(train.images[idx], train.labels[idx])
        paths.append(save_node_data(out / f"partition-{pid}", shard))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for partition-<i>/")
    parser.add_argument("--run-config", type=Path, help="a TOML preset, e.g. configs/quick.toml")
    parser.add_argument("overrides", nargs="*", help="key=value run-config overrides")
    args = parser.parse_args(argv)
    config = load_preset(args.run_config) if args.run_config else {}
    config |= parse_pairs(args.overrides)
    paths = write_node_data(RunConfig.from_run_config(config), args.out.resolve())
    print(f"wrote {len(paths)} node data sets under {args.out.resolve()}")


if __name__ == "__main__":
    main()
