"""The run-configs the benchmark submits, shared by its runs, its CLI and other benchmarks."""

from __future__ import annotations

from typing import Any

CANONICAL_ROUNDS, CANONICAL_EVAL_EVERY = 500, 10

# The canonical round (K=100, C=0.1, J=4, batch 64) on synthetic CIFAR-100-shaped data
# with the ViT-S/16 architecture at random weights: no download, same shapes and cost.
GPU_FORM: dict[str, Any] = {
    "dataset": "synthetic",
    "synthetic-train-per-class": 500,
    "model": "vit_small_patch16_224.dino",
    "weights": "random",
    "image-size": 224,
    "num-clients": 100,
    "fraction-train": 0.1,
    "local-steps": 4,
    "batch-size": 64,
    "eval-every": CANONICAL_EVAL_EVERY,
}
# The tiny CPU form: the quick preset's model and image size, the canonical federation.
TINY_FORM: dict[str, Any] = GPU_FORM | {
    "synthetic-train-per-class": 100,  # the quick preset's: 9,000 training images
    "model": "vit_tiny_test",
    "image-size": 32,
    "eval-batch-size": 500,
}
# The payload form: the canonical federation and the ViT-S/16 weights (87 MB), but one
# step of batch 1 at 32 px per client, so a round is mostly the cost of carrying the model.
PAYLOAD_FORM: dict[str, Any] = GPU_FORM | {
    "synthetic-train-per-class": 100,
    "image-size": 32,
    "local-steps": 1,
    "batch-size": 1,
    "eval-batch-size": 500,
    # the run's final test is not what this form measures: 1,000 images instead of 10,000
    # (on 2 CPU cores the ViT-S/16's test took 11-12 s of each run's 42 s)
    "synthetic-test-per-class": 10,
}
SPARSE: dict[str, Any] = {
    "strategy": "sparse-fedavg",
    "mask-strategy": "lowest_magnitude",  # no calibration rounds: every round trains
    "sparsity": 0.9,
    "head": "train",  # the dense head trains with the mask's entries (and travels with them)
    "head-warmup-rounds": 0,  # no warm-up phase: every measured round is a training round
}
