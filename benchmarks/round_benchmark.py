"""Round-time benchmark: the real app through ``flwr run``, against the compute floor.

Why this exists: a FedAvg round of the canonical setup (10 clients x 4 steps x 64
images of ViT-S/16 at 224 px) is 2,560 images of compute; everything else in a round
(Ray scheduling, message encoding, aggregation, the SuperLink) is overhead. This script
measures how far the app is from that floor, where the rest of the round goes, and whether
host memory stays flat.

What it does (the floors are measured after the runs, when their processes are gone):

1. The compute floor, in this process on the same device: a tight loop of the app's
   own ``train_local`` (same model, preprocessing and precision) over the round's
   number of images, at a few batch sizes (plus ``torch.compile`` on a GPU); the
   best rate is the floor. It also times the bare client work of a round: each
   client's J steps of its batch size, one after another, without Flower; and the copy
   floor: 20 copies of the model's weights (a round's messages, down and up) into
   preallocated buffers, one thread, best of 5.
2. A SuperLink of its own (``LocalSuperLink``, own FLWR_HOME, stopped by PID at the
   end) and, through ``flwr run``, a dense FedAvg run and a sparse run (mask without
   calibration, so every round is a training round), with K=100, C=0.1, J=4, batch 64
   on synthetic CIFAR-100-shaped data and random weights (nothing is downloaded).
3. Optionally a K=1000 run of the quick model, for host memory at scale.

While a run goes, a sampler thread reads the resident (RSS) and proportional (PSS)
memory of every process that carries this FLWR_HOME (SuperLink, ServerApp, Ray and
its workers) and how many rounds ``metrics.csv`` holds, so memory can be fitted
against rounds. After each run it reads ``metrics.csv`` and ``summary.json`` and
prints the median and spread of the round time after warm-up, its split into client
compute, communication/scheduling, aggregation and evaluation, images/s, peak GPU
memory per worker, the ratio to the floor, the projected wall time of the canonical
500-round run, and the memory slope in MB per round.

With ``--payload`` it runs the payload form: the ViT-S/16 weights at 32 px, J=1,
batch 1, so a round is mostly the cost of carrying the model; every form prints that carrying
cost (median round - bare client compute) over the copy floor, and the split of the
round the app times itself (server send, client load / compute / encode, transport,
server decode + check, aggregation).

Without a GPU (or with ``--tiny``) it runs the tiny CPU form: the quick preset's tiny
ViT at 32 px with the same K, C, J and batch (its carrying cost is the Flower path's
overhead over the bare client compute of the same images). Timings are never asserted:
a shared or busy machine changes them.

This file is the entry point; the code is the package ``benchmarks/round/``, one job a
module: ``memory`` (host memory sampling), ``floors`` (compute and copy floors), ``runs``
(``flwr run`` on a local SuperLink), ``figures`` and ``report`` (the round figures, printed
and as benchmark.json), ``forms`` (the run-configs) and ``cli``.

    python benchmarks/round_benchmark.py --tiny --rounds 3 --skip-k1000   # CI smoke
    python benchmarks/round_benchmark.py --payload --rounds 15 --skip-k1000   # carrying cost
    python benchmarks/round_benchmark.py --rounds 20                      # GPU, canonical
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a file, Python puts benchmarks/ on sys.path; the package needs the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.round.cli import main

if __name__ == "__main__":
    sys.exit(main())
