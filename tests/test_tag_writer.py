"""Tags written to CML in the background (``provider/tag_writer.py``): the newest set of
each node only, again after CML refused it, never brought back by an older listing, all
written before the process ends. The emulator contract test sees them from another
provider."""

from __future__ import annotations

import threading
import time

from ray_cml_provider.cml import CMLAPIError, CMLNotFoundError
from ray_cml_provider.provider.tag_writer import TagWriter


def test_the_newest_tags_of_each_node_are_written_and_flush_waits_for_them():
    written, started, gate = [], threading.Event(), threading.Event()

    def write(node_id, app_id, tags):
        started.set()
        gate.wait(10)
        written.append((node_id, app_id, tags["status"]))

    writer = TagWriter(write)
    writer.put("n1", "app1", {"status": "waiting"})
    assert started.wait(10)  # "waiting" is being written: CML is slow today
    writer.put("n1", "app1", {"status": "setting-up"})
    writer.put("n1", "app1", {"status": "up-to-date"})  # replaces the queued one
    writer.put("n2", "app2", {"status": "waiting"})
    assert not writer.flush(0.2)
    gate.set()
    assert writer.flush(10)
    assert sorted(written) == [
        ("n1", "app1", "up-to-date"),
        ("n1", "app1", "waiting"),
        ("n2", "app2", "waiting"),
    ]
    assert written.index(("n1", "app1", "waiting")) < written.index(("n1", "app1", "up-to-date"))


def test_a_listing_asked_before_a_write_ended_does_not_bring_old_tags_back():
    writer = TagWriter(lambda node_id, app_id, tags: None)
    listed_before = time.monotonic()
    writer.put("n1", "app1", {"status": "up-to-date"})
    assert writer.flush(10)
    assert writer.newer_than_listing(listed_before) == {"n1": {"status": "up-to-date"}}
    assert writer.newer_than_listing(time.monotonic()) == {}
    writer.forget("n1")
    assert writer.newer_than_listing(listed_before) == {}


def test_a_refused_write_is_tried_again_and_a_gone_application_is_dropped():
    attempts = []

    def write(node_id, app_id, tags):
        attempts.append(node_id)
        if node_id == "gone":
            raise CMLNotFoundError("PATCH", "/applications/x", 404, "not found")
        if attempts.count(node_id) < 3:
            raise CMLAPIError("PATCH", "/applications/x", 503, "service unavailable")

    writer = TagWriter(write)
    writer.put("gone", "x", {"a": "1"})
    writer.put("n1", "app1", {"a": "1"})
    assert writer.flush(20)
    assert attempts.count("gone") == 1 and attempts.count("n1") == 3
