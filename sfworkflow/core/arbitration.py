"""The arbitration rules of a batch: who gets an effect, who holds a claim, what a lookup sees.

Pure functions of (what instances of the batch asked for, what the database answered). `Owner` is whatever
the plan uses to name an instance in the batch (core/plan.py passes its per-instance runs); the rules compare
owners by identity only.

- Effects: the first request for an effect key in the batch is sent to the database; a later request for the
  same key in the same batch loses at once, and so does a first request whose key the database already had.
  Losers are suppressed (the command is not sent; the instance is told `effect_suppressed`).
- Claims: a key this batch already holds, or that an earlier request of the batch asked for, belongs to that
  instance; another instance asking for it is refused (`claim_refused`, naming the holder). A key the
  database refused is granted anyway when the holder row is this very instance; otherwise refused, naming the
  holder when there is one (no holder row: released by a transaction not committed yet: refused too).
- Lookups: a register written earlier in this batch is read from the batch (last write wins); otherwise the
  stored value, or None.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

Owner = TypeVar("Owner")
Item = TypeVar("Item")
K = TypeVar("K", bound=Hashable)


def first_per_key(items: Iterable[Item], key: Callable[[Item], K]) -> tuple[dict[K, Item], list[Item]]:
    """The first item of each key (in order) and the items that came later for a key already taken."""
    first: dict[K, Item] = {}
    later: list[Item] = []
    for item in items:
        k = key(item)
        if k in first:
            later.append(item)
        else:
            first[k] = item
    return first, later


def effect_losers(first: Mapping[str, Item], claimed: set[str]) -> list[Item]:
    """Of the first requests per effect key (sent to the database), those whose key was claimed before."""
    return [first[k] for k in sorted(first) if k not in claimed]


@dataclass(frozen=True, slots=True)
class Refusal(Generic[Owner]):
    owner: Owner
    key: str
    holder: Owner | None  # the instance of this batch that holds the key, when it is one of the batch


def split_claims(
    pending: Iterable[tuple[Owner, str]], held_here: Mapping[str, Owner]
) -> tuple[dict[str, Owner], list[Refusal[Owner]]]:
    """Claims to send to the database (the first asker of each key not held in this batch) and claims refused
    inside the batch (the key is held, or was asked for first, by another instance of the batch). An instance
    asking again for a key it holds or asked for is neither."""
    first: dict[str, Owner] = {}
    refused: list[Refusal[Owner]] = []
    for owner, key in pending:
        holder = held_here.get(key)
        if holder is None:
            holder = first.get(key)
        if holder is None:
            first[key] = owner
        elif holder is not owner:
            refused.append(Refusal(owner, key, holder))
    return first, refused


@dataclass(frozen=True, slots=True)
class ClaimVerdict:
    granted: bool
    holder_workflow: str = ""
    holder_entity_id: str = ""


def claim_verdict(instance_id: int | None, taken: bool, holder: tuple[int | None, str, str] | None) -> ClaimVerdict:
    """What one claim sent to the database comes to: `taken` (inserted now), else who holds the key
    (holder: instance id, workflow, entity id; None when no row holds it)."""
    if taken:
        return ClaimVerdict(True)
    if holder is not None and holder[0] == instance_id:
        return ClaimVerdict(True)  # held already by this very instance
    if holder is None:
        return ClaimVerdict(False)
    return ClaimVerdict(False, holder[1], holder[2])


def registers_to_read(keys: Iterable[str], written_here: Mapping[str, Any]) -> list[str]:
    """The register keys a batch must read from the database: those it did not write itself (sorted)."""
    return sorted({k for k in keys if k not in written_here})


def lookup_value(key: str, written_here: Mapping[str, tuple[Any, object]], stored: Mapping[str, Any]) -> Any:
    """What a lookup of `key` sees: this batch's last write, else the stored value, else None."""
    if key in written_here:
        return written_here[key][0]
    return stored.get(key)
