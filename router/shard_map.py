"""Which live worker group owns which shard: sticky, balanced rendezvous hashing, and the epoch-guarded write.

:func:`assign_shards` is pure. Every live group gets ``floor(S / G)`` or
``ceil(S / G)`` of the ``S`` shards (never more than ``ceil(S / G)``, the
bounded load). Starting from the current map it moves only the shards it
must: a shard stays with its current owner when that owner is live and not
over its share (the ``S mod G`` largest holders get the ceiling; an owner
over its share keeps the shards it has the highest weight for), so adding or
removing one group moves about ``S / G`` shards, the minimum for a balanced
map. Shards that must move go, in shard order, to the group with the
highest rendezvous weight (``blake2b(f"{group}:{shard}")``, stable across
processes and Python versions) among those with room left.

Balance is stricter than the bound alone on purpose: with only
``ceil(S / G)`` as a cap, a group joining a large fleet (e.g. the 21st group
for 64 shards) could get no shard at all and sit idle.

:func:`write_shard_map` replaces the map in Redis and increments its epoch
in one transaction, only if nobody else changed the epoch since it was read
(``WATCH``/``MULTI``): two supervisors can never interleave map writes.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import redis

from common import keys


def rendezvous_weight(group: str, shard: int) -> int:
    """The stable rendezvous (highest-random-weight) weight of ``group`` for ``shard``: a 64-bit integer."""
    digest = hashlib.blake2b(f"{group}:{shard}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def share_bounds(num_shards: int, num_groups: int) -> tuple[int, int]:
    """``(floor, ceil)`` of ``num_shards / num_groups``: each live group owns one of the two counts."""
    assert num_groups > 0
    return num_shards // num_groups, -(-num_shards // num_groups)


def assign_shards(num_shards: int, live_groups: Iterable[str], current: Mapping[int, str]) -> dict[int, str]:
    """The shard map for ``live_groups``: ``{shard: group}`` for every shard in ``[0, num_shards)``.

    Deterministic (same inputs, same map, whatever the order of
    ``live_groups``), balanced (each group owns ``floor`` or ``ceil`` of
    ``num_shards / len(live_groups)``) and sticky (the fewest shards change
    owner; see the module docstring). ``current`` may name dead groups or
    shards out of range; those entries are ignored. No live groups: ``{}``,
    and jobs wait in their queues.
    """
    keys.validate_num_shards(num_shards)
    groups = sorted(set(live_groups))
    if not groups:
        return {}
    held = _current_holdings(num_shards, groups, current)
    targets = _targets(num_shards, groups, held)
    owners: dict[int, str] = {}
    for group in groups:
        for shard in _keepers(group, held[group], targets[group]):
            owners[shard] = group
    _fill(num_shards, groups, targets, owners)
    return owners


def _current_holdings(num_shards: int, groups: list[str], current: Mapping[int, str]) -> dict[str, list[int]]:
    held: dict[str, list[int]] = {g: [] for g in groups}
    for shard, group in current.items():
        if 0 <= shard < num_shards and group in held:
            held[group].append(shard)
    return held


def _targets(num_shards: int, groups: list[str], held: dict[str, list[int]]) -> dict[str, int]:
    """How many shards each group ends with: the ``num_shards % G`` groups holding most get the ceiling."""
    floor, ceil = share_bounds(num_shards, len(groups))
    by_holding = sorted(groups, key=lambda g: (-len(held[g]), g))
    extra = set(by_holding[: num_shards % len(groups)])
    return {g: ceil if g in extra else floor for g in groups}


def _keepers(group: str, shards: list[int], target: int) -> list[int]:
    """The ``target`` (at most) of ``group``'s current shards it keeps: those it has the highest weight for."""
    ranked = sorted(shards, key=lambda s: (-rendezvous_weight(group, s), s))
    return ranked[:target]


def _fill(num_shards: int, groups: list[str], targets: dict[str, int], owners: dict[int, str]) -> None:
    """Give each unowned shard, in shard order, to the highest-weight group still below its target."""
    room = dict(targets)
    for group in owners.values():
        room[group] -= 1
    for shard in range(num_shards):
        if shard in owners:
            continue
        group = max((g for g in groups if room[g] > 0), key=lambda g: rendezvous_weight(g, shard))
        owners[shard] = group
        room[group] -= 1


def moved_shards(old: Mapping[int, str], new: Mapping[int, str]) -> list[int]:
    """The shards whose owner differs between ``old`` and ``new`` (gained, lost or changed), ascending."""
    return sorted(s for s in set(old) | set(new) if old.get(s) != new.get(s))


def write_shard_map(conn: redis.Redis, new_map: Mapping[int, str], expected_epoch: int) -> int | None:
    """Replace the shard map with ``new_map`` and increment its epoch, if the epoch is still ``expected_epoch``.

    One ``WATCH``/``MULTI`` transaction on ``keys.shard_map()`` and
    ``keys.shard_map_epoch()``: returns the new epoch, or None when another
    writer changed either key first (read the map again and retry).
    An empty ``new_map`` leaves the map empty (no group owns any shard).
    """
    with conn.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(keys.shard_map_epoch(), keys.shard_map())
            if int(pipe.get(keys.shard_map_epoch()) or 0) != expected_epoch:
                return None
            pipe.multi()
            pipe.delete(keys.shard_map())
            if new_map:
                pipe.hset(keys.shard_map(), mapping={str(s): g for s, g in sorted(new_map.items())})
            pipe.incr(keys.shard_map_epoch())
            return int(pipe.execute()[-1])
        except redis.WatchError:
            return None
