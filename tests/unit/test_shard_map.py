"""router.shard_map: property tests of assign_shards, and write_shard_map's epoch guard on fakeredis."""
from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import keys
from common.groups import read_shard_map
from router.shard_map import assign_shards, moved_shards, rendezvous_weight, share_bounds, write_shard_map

group_names = st.text(alphabet="abcdefgh0123456789-", min_size=1, max_size=6)
group_sets = st.sets(group_names, min_size=1, max_size=12)
shard_counts = st.integers(min_value=1, max_value=200)


@st.composite
def maps(draw: st.DrawFn) -> tuple[int, list[str], dict[int, str]]:
    """A shard count, a live set, and an arbitrary current map (may name dead groups, leave shards out)."""
    num_shards = draw(shard_counts)
    live = sorted(draw(group_sets))
    everyone = live + draw(st.lists(group_names, max_size=4))
    owners = draw(st.lists(st.one_of(st.none(), st.sampled_from(everyone)), min_size=num_shards,
                           max_size=num_shards))
    current = {s: g for s, g in enumerate(owners) if g is not None}
    return num_shards, live, current


def counts(shard_map: dict[int, str]) -> Counter[str]:
    return Counter(shard_map.values())


def max_kept(num_shards: int, live: list[str], current: dict[int, str]) -> int:
    """The most shards any balanced map over ``live`` can leave with their current owner (brute bound)."""
    floor, ceil = share_bounds(num_shards, len(live))
    held = sorted((sum(1 for g in current.values() if g == group) for group in live), reverse=True)
    extra = num_shards % len(live)
    return sum(min(h, ceil) for h in held[:extra]) + sum(min(h, floor) for h in held[extra:])


@given(maps())
def test_every_shard_goes_to_a_live_group(case: tuple[int, list[str], dict[int, str]]) -> None:
    num_shards, live, current = case
    new = assign_shards(num_shards, live, current)
    assert sorted(new) == list(range(num_shards))
    assert set(new.values()) <= set(live)


@given(maps())
def test_load_is_bounded_and_balanced(case: tuple[int, list[str], dict[int, str]]) -> None:
    num_shards, live, current = case
    per_group = counts(assign_shards(num_shards, live, current))
    bound = math.ceil(num_shards / len(live))
    for group in live:
        assert num_shards // len(live) <= per_group[group] <= bound


@given(maps(), st.randoms(use_true_random=False))
def test_deterministic_whatever_the_order(case: tuple[int, list[str], dict[int, str]], rnd: random.Random) -> None:
    num_shards, live, current = case
    shuffled = live[:]
    rnd.shuffle(shuffled)
    reordered = dict(sorted(current.items(), reverse=True))
    first = assign_shards(num_shards, live, current)
    assert assign_shards(num_shards, shuffled, reordered) == first
    assert assign_shards(num_shards, live, current) == first


@given(maps())
def test_moves_the_fewest_shards_a_balanced_map_allows(case: tuple[int, list[str], dict[int, str]]) -> None:
    num_shards, live, current = case
    new = assign_shards(num_shards, live, current)
    moved = moved_shards(current, new)
    assert len(moved) == num_shards - max_kept(num_shards, live, current)


@given(maps())
def test_an_owner_within_its_share_keeps_all_its_shards(case: tuple[int, list[str], dict[int, str]]) -> None:
    num_shards, live, current = case
    floor, _ = share_bounds(num_shards, len(live))
    new = assign_shards(num_shards, live, current)
    held = counts({s: g for s, g in current.items() if s < num_shards})
    for shard, owner in current.items():
        if owner in live and held[owner] <= floor:
            assert new[shard] == owner


@given(shard_counts, group_sets, group_names)
def test_adding_a_group_moves_only_what_it_takes(num_shards: int, live: set[str], newcomer: str) -> None:
    live = sorted(live - {newcomer})
    if not live:
        return
    before = assign_shards(num_shards, live, {})
    after = assign_shards(num_shards, live + [newcomer], before)
    moved = moved_shards(before, after)
    assert len(moved) <= math.ceil(num_shards / (len(live) + 1))
    assert all(after[s] == newcomer for s in moved), "old groups only give shards to the newcomer"


@given(shard_counts, group_sets.filter(lambda s: len(s) >= 2), st.data())
def test_removing_a_group_moves_only_its_shards(num_shards: int, live: set[str], data: st.DataObject) -> None:
    groups = sorted(live)
    before = assign_shards(num_shards, groups, {})
    gone = data.draw(st.sampled_from(groups))
    after = assign_shards(num_shards, [g for g in groups if g != gone], before)
    assert set(moved_shards(before, after)) == {s for s, g in before.items() if g == gone}


@given(maps())
@settings(max_examples=50)
def test_recomputing_a_computed_map_changes_nothing(case: tuple[int, list[str], dict[int, str]]) -> None:
    num_shards, live, current = case
    new = assign_shards(num_shards, live, current)
    assert assign_shards(num_shards, live, new) == new


def test_no_live_group_means_an_empty_map() -> None:
    assert assign_shards(8, [], {0: "gone", 1: "gone"}) == {}


def test_a_fresh_map_follows_rendezvous_weights() -> None:
    groups = ["g1", "g2", "g3", "g4"]
    fresh = assign_shards(64, groups, {})
    top_choice = sum(fresh[s] == max(groups, key=lambda g: rendezvous_weight(g, s)) for s in range(64))
    assert top_choice >= 40, "most shards should land on their highest-weight group"
    assert rendezvous_weight("g1", 3) == rendezvous_weight("g1", 3) != rendezvous_weight("g1", 4)


def test_a_bad_shard_count_is_refused() -> None:
    with pytest.raises(ValueError, match="num_shards"):
        assign_shards(0, ["g"], {})


# ------------------------------------------------------------------ write_shard_map


def test_write_bumps_the_epoch_and_replaces_the_map(fake_redis) -> None:
    assert write_shard_map(fake_redis, {0: "a", 1: "b"}, 0) == 1
    assert read_shard_map(fake_redis) == (1, {0: "a", 1: "b"})
    assert write_shard_map(fake_redis, {1: "a"}, 1) == 2
    assert read_shard_map(fake_redis) == (2, {1: "a"})


def test_write_refuses_a_stale_epoch(fake_redis) -> None:
    assert write_shard_map(fake_redis, {0: "a"}, 0) == 1
    assert write_shard_map(fake_redis, {0: "b"}, 0) is None
    assert read_shard_map(fake_redis) == (1, {0: "a"})


def test_write_of_an_empty_map_clears_it(fake_redis) -> None:
    write_shard_map(fake_redis, {0: "a", 1: "a"}, 0)
    assert write_shard_map(fake_redis, {}, 1) == 2
    assert read_shard_map(fake_redis) == (2, {})
    assert not fake_redis.exists(keys.shard_map())
