"""Sparse FedAvg: head warm-up, federated Fisher calibration of a gradient mask, sparse rounds.

Phases, all through the Flower Grid:

1. ``head-warmup-rounds`` FedAvg rounds in which clients train only the classifier head
   (the backbone mask is all False).
2. Calibration (Fisher strategies only): R rounds in which sampled clients return the
   diagonal Fisher of the currently trainable entries; the server averages it weighted
   by examples and tightens the mask to the density of the schedule. Magnitude and
   random masks are chosen once from the global weights, without clients.
3. ``num-server-rounds`` FedAvg rounds in which clients update only the mask's True
   entries (SparseSGDM) and send back only those values (plus the head when trained).

The mask reaches each node once per mask version; the node keeps it in its state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from strategies import protocol
from strategies.fedavg import (
    OrderedFedAvg,
    RoundRow,
    content_bytes,
    sample_partitions,
    weighted_average,
)
from strategies.masks import (
    density_schedule,
    mask_density,
    needs_fisher,
    scores_for,
    select_mask,
)
from strategies.sparse_codec import encode_mask, scatter_masked

CalibrationHook = Callable[[RoundRow], None]


class SparseFedAvg(OrderedFedAvg):
    """FedAvg over a sparse gradient mask chosen by ``mask_strategy``."""

    def __init__(
        self,
        *,
        eligible: list[str],
        head_mode: str,
        head_warmup_rounds: int,
        sparsity: float,
        mask_strategy: str,
        calibration_rounds: int,
        calibration_schedule: str,
        calibration_clients: int,
        fisher_config: Mapping[str, int | float | str],
        warmup_lr: float,
        calibration_hooks: Iterable[CalibrationHook] = (),
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.eligible = list(eligible)
        self.head_mode = head_mode
        self.head_warmup_rounds = head_warmup_rounds
        self.sparsity = sparsity
        self.mask_strategy = mask_strategy
        self.calibration_rounds = calibration_rounds
        self.calibration_schedule = calibration_schedule
        self.calibration_clients = calibration_clients
        self.fisher_config = dict(fisher_config)
        self.warmup_lr = warmup_lr
        self.calibration_hooks = list(calibration_hooks)
        self.mask: dict[str, torch.Tensor] = {}
        self.mask_version = 0
        self.node_mask_version: dict[int, int] = {}
        self.train_head = True
        self.phase = "train"
        self.restored = False
        self._global: dict[str, torch.Tensor] = {}

    # ---- phases ------------------------------------------------------------------------
    def start(
        self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, **kwargs
    ) -> Result:
        """Warm up the head, calibrate the mask, then run the sparse FedAvg rounds."""
        arrays = initial_arrays
        state = arrays.to_torch_state_dict()
        evaluate_fn = kwargs.pop("evaluate_fn", None)
        if self.restored:  # resumed in the training phase: mask and head are settled
            self.phase, self.train_head = "train", self.head_mode == "train"
            return super().start(
                grid, arrays, num_rounds=num_rounds, evaluate_fn=evaluate_fn, **kwargs
            )
        if self.head_warmup_rounds > 0:
            self.phase, self.train_head = "head-warmup", True
            self._set_mask({n: torch.zeros_like(state[n], dtype=torch.bool) for n in self.eligible})
            warm = super().start(
                grid, arrays, num_rounds=self.head_warmup_rounds, evaluate_fn=evaluate_fn, **kwargs
            )
            arrays = warm.arrays
            self.round_offset = self.head_warmup_rounds
        self.phase = "calibration"
        self._set_mask(self.calibrate(grid, arrays, kwargs.get("timeout", 3600.0)))
        self.phase, self.train_head = "train", self.head_mode == "train"
        return super().start(grid, arrays, num_rounds=num_rounds, evaluate_fn=evaluate_fn, **kwargs)

    def calibrate(self, grid: Grid, arrays: ArrayRecord, timeout: float) -> dict[str, torch.Tensor]:
        """The final mask: federated Fisher rounds, or one shot from the weights."""
        state = arrays.to_torch_state_dict()
        params = {n: state[n] for n in self.eligible}
        density = 1.0 - self.sparsity
        if not needs_fisher(self.mask_strategy):
            scores = scores_for(self.mask_strategy, params, None, self.seed)
            return select_mask(scores, density)
        self._set_mask({n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()})
        for r, target in enumerate(
            density_schedule(self.sparsity, self.calibration_rounds, self.calibration_schedule),
            start=1,
        ):
            t0 = time.perf_counter()
            fisher, row = self._fisher_round(grid, arrays, r, timeout)
            scores = scores_for(self.mask_strategy, params, fisher, self.seed)
            # entries frozen earlier can never come back: select only among current ones
            mask = select_mask(scores, target, current=self.mask)
            self._set_mask(mask)
            row |= {"density": mask_density(mask), "target-density": target}
            row["seconds"] = time.perf_counter() - t0
            for hook in self.calibration_hooks:
                hook(row)
        return self.mask

    def _fisher_round(
        self, grid: Grid, arrays: ArrayRecord, calibration_round: int, timeout: float
    ) -> tuple[dict[str, torch.Tensor], RoundRow]:
        """One calibration round: sampled clients' Fisher on the trainable entries, averaged."""

        def messages(attempt: int) -> list[Message]:
            pids = sample_partitions(
                len(self.partition_to_node),
                self.calibration_clients,
                self.seed + 7919,
                calibration_round,
                attempt,
            )
            config = ConfigRecord(
                self.fisher_config
                | {protocol.SERVER_ROUND: calibration_round, protocol.ATTEMPT: attempt}
            )
            return [self.message_for(pid, arrays, config, protocol.QUERY_FISHER) for pid in pids]

        first = messages(0)
        down = sum(content_bytes(m.content) for m in first)
        replies = grid.send_and_receive(first, timeout=timeout)
        valid, failures, extra = self.with_retries(
            replies, len(first), messages, grid, f"calibration round {calibration_round}"
        )
        weights = [float(r.content[protocol.METRICS][protocol.NUM_EXAMPLES]) for r in valid]
        vectors = [r.content[protocol.FISHER].to_torch_state_dict() for r in valid]
        mean = weighted_average(vectors, weights)
        fisher = {
            n: scatter_masked(torch.zeros(self.mask[n].shape), self.mask[n], mean[n])
            for n in self.eligible
        }
        row: RoundRow = {
            "round": calibration_round,
            "clients": len(valid),
            "failures": failures,
            "num-examples": sum(weights),
            "bytes-down": float(down + extra),
            "bytes-up": float(sum(content_bytes(r.content) for r in valid)),
        }
        return fisher, row

    # ---- training rounds ---------------------------------------------------------------
    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        out = super().round_config(server_round, config)
        out[protocol.MASK_VERSION] = self.mask_version
        out[protocol.TRAIN_HEAD] = self.train_head
        if self.phase == "head-warmup":
            out[protocol.LR] = self.warmup_lr
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays.to_torch_state_dict()
        messages = super().configure_train(server_round, arrays, config, grid)
        self._row["mask-density"] = mask_density(self.mask)
        return messages

    def aggregate_arrays(
        self, server_round: int, contents: list[RecordDict], weights: list[float]
    ) -> ArrayRecord:
        """Average the clients' trainable values and write them into the global weights."""
        sent = [c[protocol.ARRAYS].to_torch_state_dict() for c in contents]
        if self.update_metrics:
            self.log_interference([self._update(values) for values in sent], weights)
        mean = weighted_average(sent, weights)
        state = dict(self._global)
        for name, values in mean.items():
            if name in self.mask:
                state[name] = scatter_masked(state[name], self.mask[name], values)
            else:
                state[name] = values.to(state[name].dtype).reshape(state[name].shape)
        return ArrayRecord(state)

    def _update(self, sent: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A client's update: its values minus the global ones at the same (masked) entries."""
        out = {}
        for name, values in sent.items():
            if not values.is_floating_point():
                continue
            base = self._global[name]
            base = base[self.mask[name]] if name in self.mask else base.reshape(values.shape)
            out[name] = values - base.to(values.dtype)
        return out

    # ---- helpers -----------------------------------------------------------------------
    def _set_mask(self, mask: Mapping[str, torch.Tensor]) -> None:
        self.mask = {n: m.to(torch.bool) for n, m in mask.items()}
        self.mask_version += 1

    def restore_mask(self, mask: Mapping[str, torch.Tensor]) -> None:
        """Continue a checkpointed run: its final mask, no warm-up or calibration again."""
        self._set_mask(mask)
        self.restored = True

    def on_client_failure(self, node_id: int) -> None:
        """A failed node may not have stored the mask: send it again next time."""
        self.node_mask_version.pop(node_id, None)

    def message_for(
        self,
        pid: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        message_type: str = protocol.TRAIN,
    ) -> Message:
        """Weights and config for one node, with the mask only if the node lacks this version."""
        node = self.partition_to_node[pid]
        config = ConfigRecord(dict(config))
        config[protocol.MASK_VERSION] = self.mask_version
        content = RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: config})
        if self.node_mask_version.get(node) != self.mask_version:
            content[protocol.MASK] = encode_mask(self.mask)
            self.node_mask_version[node] = self.mask_version
        return Message(content, dst_node_id=node, message_type=message_type)
