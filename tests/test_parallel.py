"""Processes under torchrun: each rank's share of a list (torchrun itself: test_train, test_cli, test_distill)."""

from __future__ import annotations

from nmt.parallel import Ranks


def test_ranks_share_a_list_in_contiguous_parts_that_cover_it_once():
    for count in (0, 1, 5, 12, 13):
        for world in (1, 2, 3, 5):
            parts = [Ranks(rank, world).share(count) for rank in range(world)]
            assert [i for part in parts for i in part] == list(range(count))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
