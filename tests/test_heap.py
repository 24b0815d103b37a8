"""heap.frozen: objects made before a block are out of the cycle collector's reach inside it, nested blocks add what
was made since, and only the outermost block's end gives them back."""

from __future__ import annotations

import gc

from rded_fast import heap


def test_nested_blocks_freeze_more_and_unfreeze_once_at_the_outermost_end():
    before = gc.get_freeze_count()
    with heap.frozen():
        outer = gc.get_freeze_count()
        assert outer > before
        made_inside = [[i] for i in range(1000)]  # tracked containers made after the outer block began
        with heap.frozen():
            assert gc.get_freeze_count() >= outer + len(made_inside)
        assert gc.get_freeze_count() >= outer + len(made_inside)  # the inner end unfreezes nothing
    assert gc.get_freeze_count() == 0
