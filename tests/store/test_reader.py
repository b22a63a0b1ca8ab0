"""The two sides of the state store as opened from [state]: an admin write reaches a reader's
subscribers as a new snapshot, on the loop, and the reader writes the data path's activity."""
from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref

import pytest

from fastproxy.config import StateConfig
from fastproxy.store import StateAdmin, StateReader, StoreError, open_admin, open_reader
from fastproxy.store import sqlite as sqlite_backend


@pytest.fixture
def state(tmp_path):
    return StateConfig(path=str(tmp_path / "state.db"))


@pytest.fixture
def admin(state):
    admin = open_admin(state)
    yield admin
    admin.close()


def test_the_factories_open_the_configured_backend(state, admin):
    assert isinstance(admin, StateAdmin)
    reader = open_reader(state)
    try:
        assert isinstance(reader, StateReader)
        assert not reader.snapshot.keys and not reader.failing
    finally:
        reader.close()
    with pytest.raises(StoreError, match="^state backend 'zookeeper' is not one of sqlite, etcd$"):
        open_reader(StateConfig(path=state.path, backend="zookeeper"))
    with pytest.raises(StoreError, match="^state backend 'zookeeper' is not one of sqlite, etcd$"):
        open_admin(StateConfig(path=state.path, backend="zookeeper"))


def test_an_admin_write_reaches_the_subscribers_on_the_loop(state, admin):
    admin.create_user("alice")
    reader = open_reader(state)
    first = reader.snapshot
    assert "alice" in first.users and not first.keys

    async def scenario():
        loop = asyncio.get_running_loop()
        delivered: list = []
        seen = asyncio.Event()

        def on_snapshot(snapshot):
            assert threading.current_thread() is threading.main_thread()  # on the loop's thread
            delivered.append(snapshot)
            seen.set()
        reader.subscribe(on_snapshot)
        reader.start(loop)
        await asyncio.sleep(2 * sqlite_backend.POLL_INTERVAL)
        assert delivered == []  # nothing changed: no notification
        _, secret = await loop.run_in_executor(None, lambda: admin.create_access_key(user="alice", name="k"))
        written = time.monotonic()
        await asyncio.wait_for(seen.wait(), 3.0)
        return delivered, secret, time.monotonic() - written

    try:
        delivered, secret, took = asyncio.run(scenario())
    finally:
        reader.close()
    assert took < 3 * sqlite_backend.POLL_INTERVAL
    assert len(delivered) == 1 and reader.snapshot is delivered[0]
    assert delivered[0].version != first.version
    assert delivered[0].resolve(secret, time.time()).identity.user == "alice"


def test_activity_goes_through_the_reader_and_is_written_by_close(state, admin):
    admin.create_user("alice")
    admin.create_access_key(user="alice", name="k")
    reader = open_reader(state)

    async def scenario():
        reader.start(asyncio.get_running_loop())
        reader.record_activity({"k": 1_800_000_000.0})
        reader.close()  # returns once the write it was asked for is done
    asyncio.run(scenario())
    assert [key.last_activity for key in admin.list_access_keys()] == [1_800_000_000.0]


# ---- waiting for a write to be seen ----

def test_wait_for_a_version_already_reached_is_done_at_once(state, admin):
    user = admin.create_user("alice")
    reader = open_reader(state)

    async def scenario():
        future = reader.wait_for(user.resource_version)
        assert future.done()  # before any poll, before start even
        return future.result()
    try:
        snapshot = asyncio.run(scenario())
    finally:
        reader.close()
    assert snapshot is reader.snapshot and snapshot.users["alice"] == user


def test_wait_for_looks_at_once_for_a_write_by_another_store_object(state, admin, monkeypatch):
    # Polls this far apart would fail the test: only the immediate look wait_for asks for can pass it.
    monkeypatch.setattr(sqlite_backend, "POLL_INTERVAL", 60.0)
    reader = open_reader(state)
    delivered: list = []
    reader.subscribe(delivered.append)

    async def scenario():
        loop = asyncio.get_running_loop()
        reader.start(loop)
        user = await loop.run_in_executor(None, lambda: admin.create_user("alice", labels={"team": "ops"}))
        written = time.monotonic()
        snapshot = await asyncio.wait_for(reader.wait_for(user.resource_version), 5.0)
        return user, snapshot, time.monotonic() - written
    try:
        user, snapshot, took = asyncio.run(scenario())
    finally:
        reader.close()
    assert took < sqlite_backend.POLL_INTERVAL / 10
    assert snapshot.version >= user.resource_version
    assert snapshot.users["alice"] == user
    assert delivered == [snapshot]  # the subscribers heard of it first


def test_wait_for_during_a_poll_that_looked_too_early_polls_again(state, admin, monkeypatch):
    monkeypatch.setattr(sqlite_backend, "POLL_INTERVAL", 60.0)
    reader = open_reader(state)
    looked, release = threading.Event(), threading.Event()
    changed_since = reader.store.changed_since

    def slow_first_look(version):
        answer = changed_since(version)
        if not looked.is_set():
            looked.set()
            release.wait(5.0)
        return answer
    monkeypatch.setattr(reader.store, "changed_since", slow_first_look)

    async def scenario():
        loop = asyncio.get_running_loop()
        reader.start(loop)
        reader.poll_now()  # a poll that looks before the write, and answers after it
        await loop.run_in_executor(None, looked.wait, 5.0)
        user = await loop.run_in_executor(None, lambda: admin.create_user("alice"))
        waiting = reader.wait_for(user.resource_version)
        release.set()
        return user, await asyncio.wait_for(waiting, 5.0)
    try:
        user, snapshot = asyncio.run(scenario())
    finally:
        reader.close()
    assert snapshot.users["alice"] == user


def test_waits_given_up_are_dropped_and_close_cancels_the_rest(state, admin):
    reader = open_reader(state)

    async def scenario():
        reader.start(asyncio.get_running_loop())
        version = reader.snapshot.version
        given_up = reader.wait_for(version + 1000)
        given_up.cancel()
        dropped = weakref.ref(given_up)
        del given_up
        await asyncio.sleep(0)  # the done callback that forgets it
        gc.collect()
        pending = reader.wait_for(version + 1000)
        reader.close()
        return dropped, pending, reader.wait_for(version + 1000), reader.wait_for(version)
    dropped, pending, after_close, reached = asyncio.run(scenario())
    assert dropped() is None
    assert pending.cancelled() and after_close.cancelled()
    assert reached.result() is reader.snapshot


def test_namespace_activity_reloads_on_its_own_generation(tmp_path):
    """Activity writes reach every reader without a full reload, and never move back in time."""
    from fastproxy.store import NamespaceActivity
    from fastproxy.store.sqlite import SqliteReader, SqliteStore

    writer = SqliteStore(tmp_path / "state.db")
    writer.create_user("alice")
    reader = SqliteReader(SqliteStore(tmp_path / "state.db"))
    before = reader.snapshot
    assert before.activities == {}
    writer.record_namespace_activity({("prod", "team-a"): NamespaceActivity(
        "prod", "team-a", 100.0, subject="alice", verb="list", resource="pods")})
    writer.record_namespace_activity({("prod", "team-a"): NamespaceActivity("prod", "team-a", 50.0, verb="get")})
    fresh = reader._fresh_snapshot(before)
    assert fresh is not None and fresh.version == before.version and fresh.keys is before.keys  # keys not rebuilt
    assert fresh.activities[("prod", "team-a")] == NamespaceActivity(
        "prod", "team-a", 100.0, subject="alice", verb="list", resource="pods")
    assert reader._fresh_snapshot(fresh) is None
    assert [activity.namespace for activity in writer.list_namespace_activity()] == ["team-a"]
    reader.close()
    writer.close()
