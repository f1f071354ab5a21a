"""Sparse FedAvg: FedAvg over a gradient mask, with head warm-up and Fisher calibration phases.

The plan (``strategies/plan.py``) walks three phases, entered in ``enter_phase``:

1. ``head-warmup``: FedAvg rounds in which clients train only the classifier head
   (the backbone mask is all False) at the constant warm-up learning rate.
2. ``calibration`` (Fisher strategies only): sampled clients return the diagonal Fisher
   of the currently trainable entries; the server averages it weighted by examples and
   tightens the mask to the density of the schedule. Magnitude and random masks are
   chosen once from the global weights when training starts, without clients.
3. ``train``: FedAvg rounds in which clients update only the mask's True entries
   (SparseSGDM) and send back only those values (plus the head when it trains).

Everything else is FedAvg's: this class overrides small pieces and calls ``super()``.
The mask reaches each node once per mask version; the node keeps it in its state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message

from strategies import protocol
from strategies.fedavg import OrderedFedAvg, example_weights, rejected, weighted_average
from strategies.masks import (
    density_schedule,
    mask_density,
    needs_fisher,
    scores_for,
    select_mask,
)
from strategies.plan import CALIBRATION, HEAD_WARMUP, TRAIN, RoundPosition
from strategies.record import RoundRecord
from strategies.reply_checks import Layout, fisher_metrics_problem, head_layout, masked_layout
from strategies.rounds import CheckedReply, RoundRequest
from strategies.seeds import derive_seed
from strategies.sparse_codec import encode_mask, mask_positions, scatter_at

FISHER_DTYPE = torch.float32  # what clients/fisher.py returns

# the head warm-up trains a linear probe with SGD momentum, whatever the run's optimizer:
# every optimizer arm then starts its sparse fine-tuning from the same head
WARMUP_OPTIMIZER = "sgdm"


class SparseFedAvg(OrderedFedAvg):
    """FedAvg over a sparse gradient mask chosen by ``mask_strategy``."""

    def __init__(
        self,
        *,
        eligible: list[str],
        head_mode: str,
        sparsity: float,
        mask_strategy: str,
        calibration_schedule: str,
        calibration_clients: int,
        fisher_config: Mapping[str, int | float | str],
        warmup_lr: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.eligible = list(eligible)
        self.head_mode = head_mode
        self.sparsity = sparsity
        self.mask_strategy = mask_strategy
        self.calibration_schedule = calibration_schedule
        self.calibration_clients = calibration_clients
        self.fisher_config = dict(fisher_config)
        self.warmup_lr = warmup_lr
        self.mask: dict[str, torch.Tensor] = {}
        self.mask_version = 0
        self._encoded: tuple[int, ArrayRecord] | None = None  # (version, packed mask)
        self._positions: tuple[int, dict[str, torch.Tensor]] | None = None  # (version, indices)
        self.node_mask_version: dict[int, int] = {}
        # "average" schedule: example-weighted Fisher summed over the calibration rounds
        self.fisher_sum: dict[str, torch.Tensor] = {}
        self.fisher_examples = 0.0

    # ---- phases --------------------------------------------------------------------------
    def enter_phase(self, position: RoundPosition, arrays: ArrayRecord) -> None:
        """Warm-up trains no backbone entry; calibration starts from all; training fixes it."""
        state = self.tensors_of(arrays)
        if position.phase == HEAD_WARMUP:
            self.set_mask({n: torch.zeros_like(state[n], dtype=torch.bool) for n in self.eligible})
        elif position.phase == CALIBRATION:
            self.set_mask({n: torch.ones_like(state[n], dtype=torch.bool) for n in self.eligible})
            self.fisher_sum, self.fisher_examples = {}, 0.0
        elif position.phase == TRAIN and not needs_fisher(self.mask_strategy):
            params = {n: state[n] for n in self.eligible}
            seed = derive_seed(self.seed, "random-mask")
            scores = scores_for(self.mask_strategy, params, None, seed)
            self.set_mask(select_mask(scores, 1.0 - self.sparsity))

    def train_head(self, position: RoundPosition) -> bool:
        return position.phase == HEAD_WARMUP or self.head_mode == "train"

    def lr(self, position: RoundPosition) -> float:
        if position.phase == HEAD_WARMUP:
            return self.warmup_lr
        return super().lr(position)

    def configure(
        self, position: RoundPosition, arrays: ArrayRecord, record: RoundRecord
    ) -> RoundRequest:
        """Calibration asks for the Fisher of the trainable entries; the other rounds train."""
        if position.phase == CALIBRATION:
            layout = masked_layout(self.mask, dict.fromkeys(self.mask, FISHER_DTYPE))
            return RoundRequest(
                lambda attempt: self.fisher_messages(position, arrays, attempt),
                lambda reply: self.check_fisher_reply(reply, layout),
            )
        record.add({"mask-density": mask_density(self.mask)})
        return super().configure(position, arrays, record)

    def aggregate(
        self,
        position: RoundPosition,
        arrays: ArrayRecord,
        replies: Sequence[CheckedReply],
        record: RoundRecord,
    ) -> ArrayRecord:
        """Calibration tightens the mask and never changes the global weights."""
        if position.phase == CALIBRATION:
            self.calibrate(position, arrays, replies, record)
            return arrays
        return super().aggregate(position, arrays, replies, record)

    # ---- calibration ---------------------------------------------------------------------
    def fisher_messages(
        self, position: RoundPosition, arrays: ArrayRecord, attempt: int
    ) -> list[Message]:
        """One Fisher query per sampled partition, with the mask of trainable entries."""
        config = ConfigRecord(
            self.fisher_config | {protocol.SERVER_ROUND: position.round, protocol.ATTEMPT: attempt}
        )
        pids = self.sample(position, self.calibration_clients, attempt)
        return [self.message_for(pid, arrays, config, protocol.QUERY_FISHER) for pid in pids]

    def aggregate_fisher(self, replies: Sequence[CheckedReply]) -> dict[str, torch.Tensor]:
        """The example-weighted mean Fisher, scattered back to full tensor shapes."""
        replies = sorted(replies, key=lambda r: r.partition)
        mean = weighted_average([r.tensors for r in replies], example_weights(replies))
        return {
            n: scatter_at(torch.zeros(self.mask[n].shape), self.positions()[n], mean[n])
            for n in self.eligible
        }

    def calibrate(
        self,
        position: RoundPosition,
        arrays: ArrayRecord,
        replies: Sequence[CheckedReply],
        record: RoundRecord,
    ) -> None:
        """Score the trainable entries with the clients' Fisher; keep the schedule's share."""
        fisher, examples = self.aggregate_fisher(replies), sum(example_weights(replies))
        schedule = density_schedule(self.sparsity, position.phase_rounds, self.calibration_schedule)
        target = schedule[position.phase_round - 1]
        record.add({"num-examples": examples, "target-density": target})
        if self.calibration_schedule == "average":
            fisher = self.accumulate_fisher(fisher, examples, position.last_of_phase)
        if fisher is not None:
            state = self.tensors_of(arrays)
            params = {n: state[n] for n in self.eligible}
            scores = scores_for(self.mask_strategy, params, fisher, self.seed)
            # entries frozen earlier can never come back: select only among current ones
            self.set_mask(select_mask(scores, target, current=self.mask))
        record.add({"density": mask_density(self.mask)})

    def check_fisher_reply(self, reply: Message, layout: Layout) -> CheckedReply | str:
        """A Fisher reply with its values decoded once, or why it must not be averaged.

        Its metrics must name the partition asked, with at most min(fisher-samples, shard)
        examples; its values must fit the mask (``layout``), be finite and non-negative.
        """
        pid = self.node_to_partition.get(reply.metadata.src_node_id)
        metrics = reply.content.metric_records.get(protocol.METRICS)
        problem = fisher_metrics_problem(metrics, pid, self.fisher_limit(pid))
        if problem:
            return rejected(reply, pid, problem)
        return self.checked_reply(reply, protocol.FISHER, layout, pid, nonnegative=True)

    def fisher_limit(self, pid: int | None) -> int | None:
        """The most examples a node's Fisher uses: min(fisher-samples, its shard), as known."""
        bounds = (self.fisher_config.get(protocol.FISHER_SAMPLES), self.shard_sizes.get(pid))
        known = [int(b) for b in bounds if b is not None]
        return min(known) if known else None

    def accumulate_fisher(
        self, fisher: Mapping[str, torch.Tensor], examples: float, last: bool
    ) -> dict[str, torch.Tensor] | None:
        """Add a round's mean Fisher, weighted by its examples; after the last round the
        mean over all rounds, before it None (the "average" schedule selects only once)."""
        for name, values in fisher.items():
            weighted = values.to(torch.float64) * examples
            self.fisher_sum[name] = self.fisher_sum.get(name, 0.0) + weighted
        self.fisher_examples += examples
        if not last:
            return None
        return {n: (s / self.fisher_examples).float() for n, s in self.fisher_sum.items()}

    # ---- training rounds -----------------------------------------------------------------
    def round_config(self, position: RoundPosition, attempt: int) -> ConfigRecord:
        out = super().round_config(position, attempt)
        out[protocol.TRAIN_HEAD] = self.train_head(position)
        if position.phase == HEAD_WARMUP:
            out[protocol.LOCAL_OPTIMIZER] = WARMUP_OPTIMIZER
        return out

    def train_layout(self, position: RoundPosition, arrays: ArrayRecord) -> Layout:
        """What a sparse reply holds: per mask tensor its True entries' values (the codec's
        layout), and the dense head when it trains (in warm-up the mask is all False)."""
        dense = super().train_layout(position, arrays)
        layout = masked_layout(self.mask, {n: dense[n].dtype for n in self.mask})
        if self.train_head(position):
            layout |= head_layout(dense)
        return layout

    def sent_values(
        self, base: Mapping[str, torch.Tensor], name: str, values: torch.Tensor
    ) -> torch.Tensor:
        """The sent values at the mask's True entries (once per tensor, not per client);
        the dense head as it was sent."""
        if name not in self.mask:
            return super().sent_values(base, name, values)
        return base[name].reshape(-1).index_select(0, self.positions()[name]).to(values.dtype)

    def merged_state(
        self, base: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The trained values (the mean's, or one client's) written into the sent weights
        at the mask's positions, and the head where it trained; the rest stays as sent
        (shared with ``base``, not copied)."""
        state = dict(base)
        for name, trained in values.items():
            if name in self.mask:
                state[name] = scatter_at(state[name], self.positions()[name], trained)
            else:
                state[name] = trained.to(state[name].dtype).reshape(state[name].shape)
        return state

    # ---- the mask on the wire ------------------------------------------------------------
    def set_mask(self, mask: Mapping[str, torch.Tensor]) -> None:
        self.mask = {n: m.to(torch.bool) for n, m in mask.items()}
        self.mask_version += 1

    def on_client_failure(self, node_id: int) -> None:
        """A failed node may not have stored the mask: send it again next time."""
        self.node_mask_version.pop(node_id, None)

    def message_for(
        self, pid: int, arrays: ArrayRecord, config: ConfigRecord, message_type: str
    ) -> Message:
        """Weights and config for one node, with the mask only if the node lacks this version."""
        node = self.partition_to_node[pid]
        config = ConfigRecord(dict(config) | {protocol.MASK_VERSION: self.mask_version})
        message = super().message_for(pid, arrays, config, message_type)
        if self.node_mask_version.get(node) != self.mask_version:
            message.content[protocol.MASK] = self.encoded_mask()
            self.node_mask_version[node] = self.mask_version
        return message

    def positions(self) -> dict[str, torch.Tensor]:
        """The mask's True entries as flat indices, derived once per version."""
        if self._positions is None or self._positions[0] != self.mask_version:
            self._positions = (self.mask_version, mask_positions(self.mask))
        return self._positions[1]

    def encoded_mask(self) -> ArrayRecord:
        """The packed mask of the current version, encoded once (not once per node)."""
        if self._encoded is None or self._encoded[0] != self.mask_version:
            self._encoded = (self.mask_version, encode_mask(self.mask))
        return self._encoded[1]

    def outputs(self) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
        """The final mask (``mask.safetensors``, 0/1) and its density in the summary."""
        summary = {"mask-density": mask_density(self.mask), "mask-strategy": self.mask_strategy}
        return summary, {"mask.safetensors": {n: m.to(torch.uint8) for n, m in self.mask.items()}}

    # ---- Saveable ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The mask and its version, and the server rule's state; which node holds which
        mask version is not kept (resent)."""
        return super().state_dict() | {
            "mask": dict(self.mask),
            "mask-version": self.mask_version,
            "fisher-sum": dict(self.fisher_sum),
            "fisher-examples": self.fisher_examples,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.mask = {n: m.to(torch.bool) for n, m in state["mask"].items()}
        self.mask_version = int(state["mask-version"])
        self._encoded = self._positions = None
        self.node_mask_version = {}
        self.fisher_sum = dict(state["fisher-sum"])
        self.fisher_examples = float(state["fisher-examples"])
