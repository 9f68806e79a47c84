"""The protocols a checkpoint is made of: named stateful parts, shared or per rank.

A checkpoint is the union of its parts' ``state_dict()``s (torchtitan's checkpoint manager takes
the same shape, ``dict[str, Stateful]``). Two kinds:

- :class:`Stateful`: one state for the whole run (the Trainer's counters); rank 0 writes it,
  every rank reads it back.
- :class:`RankStateful`: one state per rank (the data position, the RNGs). On load a part gets
  :class:`RankStates`: its own saved state and, when it needs them (the world size or the
  worker count changed), every saved rank's. What to do with them is the part's business.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Stateful(Protocol):
    """A part with one state for the whole run."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@runtime_checkable
class RankStateful(Protocol):
    """A part whose state differs per rank."""

    def state_dict(self) -> Any: ...

    def load_rank_states(self, states: RankStates) -> None: ...


@dataclass
class RankStates:
    """What a :class:`RankStateful` part restores from: this rank's saved state (``None`` when
    the saved run had no such rank) and, read on demand, every saved rank's (:meth:`all`)."""

    own: Any | None
    saved_world_size: int
    read: Callable[[int], Any] = field(repr=False)

    def all(self) -> list[Any]:
        """Every saved rank's state, in rank order (reads the other ranks' files)."""
        return [self.read(rank) for rank in range(self.saved_world_size)]
