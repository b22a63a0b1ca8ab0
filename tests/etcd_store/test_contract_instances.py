"""The virtual cluster instances' store contract (tests/store/test_instances.py) on a real etcd: the
same checks, versions, write-only token and snapshot as the SQLite backend's."""
from __future__ import annotations

from tests.store import test_instances

for name, value in vars(test_instances).items():
    if name.startswith("test_"):
        globals()[name] = value
