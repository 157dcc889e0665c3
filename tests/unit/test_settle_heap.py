"""``serve`` settles its heap once started: start-up garbage collected, the rest frozen, so a
full collection under traffic walks only what traffic made; the youngest generation collected
less often (see ``serve.settle_heap``)."""

from __future__ import annotations

import gc
import weakref
from typing import Any, Iterator

import pytest

from authz_server.serve import YOUNG_GENERATION_THRESHOLD, settle_heap


class Node:
    def __init__(self) -> None:
        self.me: Any = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture
def thawed() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()  # the rest of the suite runs with an ordinary heap
    gc.set_threshold(*thresholds)


def test_what_start_up_kept_is_frozen_and_its_garbage_is_gone(thawed: None) -> None:
    kept = Node()
    garbage = weakref.ref(Node())
    settle_heap()
    assert garbage() is None, "a start-up cycle nobody holds was frozen instead of collected"
    assert gc.get_freeze_count() > 0
    assert not any(found is kept for found in gc.get_objects()), "a start-up object is still walked by collections"
    made_later = Node()
    assert any(found is made_later for found in gc.get_objects())


def test_the_youngest_generation_is_collected_less_often_and_the_older_ones_as_before(thawed: None) -> None:
    gc.set_threshold(700, 10, 10)
    settle_heap()
    assert gc.get_threshold() == (YOUNG_GENERATION_THRESHOLD, 10, 10)
    garbage = weakref.ref(Node())
    gc.collect(0)
    assert garbage() is None, "cycles made after start-up are still collected"
