"""The plan of a run and the one round counter that walks it.

A run is a list of phases (head warm-up, calibration, training), each a number of
rounds. ``RoundClock`` owns the global round number: round 0 is the initial model,
then the phases follow one another without gaps. Messages, metrics rows, progress
lines, the best model, checkpoints and the summary all read the round from it, so a
round has one number everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

HEAD_WARMUP = "head-warmup"
CALIBRATION = "calibration"
TRAIN = "train"
INITIAL = "initial"  # round 0: the model before any round
PHASES = (HEAD_WARMUP, CALIBRATION, TRAIN)


@dataclass(frozen=True)
class Phase:
    """``rounds`` consecutive rounds of one kind."""

    name: str
    rounds: int


@dataclass(frozen=True)
class RoundPosition:
    """Where a round sits: its global number, its phase and its number within the phase."""

    round: int
    phase: str
    phase_round: int
    phase_rounds: int  # rounds of this phase in the plan

    @property
    def last_of_phase(self) -> bool:
        return self.phase_round == self.phase_rounds


class RoundClock:
    """The run's phases and how many rounds of them are done; the only round counter."""

    def __init__(self, phases: Sequence[Phase]) -> None:
        names = [p.name for p in phases]
        unknown = [n for n in names if n not in PHASES]
        if unknown or len(set(names)) != len(names) or any(p.rounds < 0 for p in phases):
            raise ValueError(f"a plan holds each of {PHASES} at most once, rounds >= 0: {phases}")
        self.phases = [p for p in phases if p.rounds > 0]
        self.completed = 0

    @property
    def total_rounds(self) -> int:
        return sum(p.rounds for p in self.phases)

    @property
    def finished(self) -> bool:
        return self.completed >= self.total_rounds

    def rounds_of(self, phase: str) -> int:
        return sum(p.rounds for p in self.phases if p.name == phase)

    def position(self, global_round: int) -> RoundPosition:
        """The phase and phase round of global round ``global_round`` (0 = initial model)."""
        if global_round == 0:
            return RoundPosition(0, INITIAL, 0, 0)
        start = 0
        for phase in self.phases:
            if global_round <= start + phase.rounds:
                return RoundPosition(global_round, phase.name, global_round - start, phase.rounds)
            start += phase.rounds
        raise ValueError(f"round {global_round} is past the plan's {self.total_rounds} rounds")

    def next_round(self) -> RoundPosition:
        """The position of the round to run now."""
        return self.position(self.completed + 1)

    def complete(self, position: RoundPosition) -> None:
        """Mark ``position`` done; rounds are completed in order, each once."""
        if position.round != self.completed + 1:
            raise ValueError(f"round {position.round} completed, expected {self.completed + 1}")
        self.completed = position.round

    def describe(self) -> str:
        return ", ".join(f"{p.rounds} {p.name}" for p in self.phases)

    # ---- Saveable ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"completed": self.completed, "phases": [(p.name, p.rounds) for p in self.phases]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = [tuple(p) for p in state["phases"]]
        if saved != [(p.name, p.rounds) for p in self.phases]:
            raise ValueError(f"the saved plan {saved} is not this run's plan ({self.describe()})")
        self.completed = int(state["completed"])
