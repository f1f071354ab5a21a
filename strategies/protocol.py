"""The wire protocol between the ServerApp and the ClientApp: message types and record keys.

The server speaks it and ``flower_app/client_app.py`` imports it to answer, so a key
is spelled in exactly one place.
"""

from __future__ import annotations

from flwr.app import MessageType

# Message types
TRAIN = MessageType.TRAIN
QUERY_PARTITION = f"{MessageType.QUERY}.partition"  # which shard does a node hold?

# The classifier head's tensors (timm names): sent dense, never masked, reported apart
HEAD_PREFIX = "head."

# Record keys in a message's RecordDict
ARRAYS = "arrays"  # ArrayRecord: model weights (or the trainable part of them)
CONFIG = "config"  # ConfigRecord: per-round settings sent down
METRICS = "metrics"  # MetricRecord: what a client reports back

# ConfigRecord keys (server -> client)
SERVER_ROUND = "server-round"  # the global round (strategies/plan.py); clients seed from it
LR = "lr"

# MetricRecord keys (client -> server)
NUM_EXAMPLES = "num-examples"  # client data size: the FedAvg weight
PARTITION_ID = "partition-id"  # fixes the aggregation order
TRAIN_LOSS = "train-loss"
CLASSES = "classes"  # list of class ids a shard holds (partition query)
CLASS_COUNTS = "class-counts"  # examples per class, aligned with CLASSES
CLIENT_SECONDS = "client-seconds"  # wall seconds of local training (GPU synchronised)
GPU_MEMORY_MB = "gpu-memory-mb"  # peak CUDA memory allocated during training (CUDA only)

# Where a simulated client trained (train replies of Ray actors only; flower_app/runs/
# worker_gpus.py). A MetricRecord holds numbers, so device ids are integers: Ray's GPU ids
# and CUDA_VISIBLE_DEVICES's entries, -1 for an entry that is no index (a GPU UUID).
WORKER_PID = "worker-pid"  # the worker process (one per Ray actor)
RAY_GPU_IDS = "ray-gpu-ids"  # list: the GPU ids Ray gave the actor ([] for none)
CUDA_VISIBLE_DEVICES = "cuda-visible-devices"  # list: the variable's entries; absent if unset
CUDA_DEVICE_COUNT = "cuda-device-count"  # torch.cuda.device_count() in the worker
PLACEMENT_KEYS = (WORKER_PID, RAY_GPU_IDS, CUDA_VISIBLE_DEVICES, CUDA_DEVICE_COUNT)

# Sparse fine-tuning
QUERY_FISHER = f"{MessageType.QUERY}.fisher"  # diagonal Fisher of the trainable entries
MASK = "mask"  # ArrayRecord: packed-bit mask per tensor (sent once per mask version)
FISHER = "fisher"  # ArrayRecord: Fisher values at the mask's True entries (1-D per tensor)
MASK_VERSION = "mask-version"  # ConfigRecord: which mask the message assumes
TRAIN_HEAD = "train-head"  # ConfigRecord: whether the dense head trains this round
# ConfigRecord: the local optimizer of this round when it is not the run-config's (head
# warm-up: always SGD with momentum, the linear probe every optimizer arm starts from)
LOCAL_OPTIMIZER = "local-optimizer"
FISHER_SAMPLES = "fisher-samples"
FISHER_LABELS = "fisher-labels"
CALIBRATION_DAMPING = "calibration-damping"  # frozen entries x this while scoring
FISHER_SCORE = "fisher-score"

# Reliability
ATTEMPT = "attempt"  # ConfigRecord: 0 for a round's first sample, k for its k-th retry

# Weights by reference (strategies/transport/shared_weights.py)
REF_SUFFIX = "-ref"  # ConfigRecord "<key>-ref": a file reference in place of ArrayRecord "<key>"
SHARED_PROBE = "shared-probe"  # ConfigRecord: a probe file's reference, or the reason for none
REPLY_TENSORS = (ARRAYS, FISHER)  # the records a reply's tensors travel in, or their refs
CLIENT_LOAD_SECONDS = "client-load-seconds"  # MetricRecord: decode + load the received weights
CLIENT_ENCODE_SECONDS = "client-encode-seconds"  # MetricRecord: encode the reply's tensors


def ref_key(key: str) -> str:
    """The ConfigRecord key that carries a reference to the tensors of record ``key``."""
    return f"{key}{REF_SUFFIX}"
