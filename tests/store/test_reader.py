"""The two sides of the state store as opened from [state]: an admin write reaches a reader's
subscribers as a new snapshot, on the loop, and the reader writes the data path's activity."""
from __future__ import annotations

import asyncio
import threading
import time

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
        assert reader.snapshot.keys == {} and not reader.failing
    finally:
        reader.close()
    with pytest.raises(StoreError, match="^state backend 'etcd' is not one of sqlite$"):
        open_reader(StateConfig(path=state.path, backend="etcd"))
    with pytest.raises(StoreError, match="^state backend 'etcd' is not one of sqlite$"):
        open_admin(StateConfig(path=state.path, backend="etcd"))


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
