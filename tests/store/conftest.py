"""The fixture the store's tests share: an empty SQLite store in a file of its own."""
from __future__ import annotations

import pytest

from fastproxy.store.sqlite import SqliteStore


@pytest.fixture
def store(tmp_path):
    store = SqliteStore(tmp_path / "state.db")
    yield store
    store.close()
