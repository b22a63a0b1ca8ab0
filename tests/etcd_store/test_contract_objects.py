"""The store contract the SQLite backend's tests set out, run against the etcd backend on a real etcd.

The tests are those of tests/store, imported here so that this module's `store` fixture (conftest:
an EtcdStore on a prefix of its own) replaces theirs; those about SQLite itself (files, migrations,
connections, its generation counter) are left out.
"""
from __future__ import annotations

from tests.etcd_store.contract import adopt
from tests.store import test_objects

adopt(test_objects, globals())
