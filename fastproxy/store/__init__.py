"""State storage: users, teams, access keys and revoked token ids.

Two sides (see base.py): `StateAdmin`, the CRUD the CLI and the management API use, and `StateReader`, the snapshot the
data path reads. `open_admin` and `open_reader` open the backend `[state] backend` names; no
other module names a backend class.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .base import (
    AccessKey,
    AlreadyExistsError,
    ConflictError,
    InvalidError,
    InvalidScopeError,
    NamespaceActivity,
    NotFoundError,
    ResolvedKey,
    Snapshot,
    SnapshotCallback,
    StateAdmin,
    StateReader,
    StoreError,
    Team,
    UnavailableError,
    User,
    VirtualClusterInstance,
    build_identity,
    key_digest,
)
from .sqlite import SqliteReader, SqliteStore


def _etcd_store(state: StateConfig) -> StateAdmin:
    from .etcd import EtcdStore  # loaded only by a gateway that uses it
    assert state.etcd is not None
    return EtcdStore(state.etcd)


def _etcd_reader(state: StateConfig) -> StateReader:
    from .etcd import EtcdReader, EtcdStore
    assert state.etcd is not None
    return EtcdReader(EtcdStore(state.etcd))

if TYPE_CHECKING:
    from ..config import StateConfig

# backend name -> (admin opener, reader opener); the names are config.STATE_BACKENDS.
BACKENDS: dict[str, tuple[Callable[[StateConfig], StateAdmin], Callable[[StateConfig], StateReader]]] = {
    "sqlite": (lambda state: SqliteStore(state.path), lambda state: SqliteReader(SqliteStore(state.path))),
    "etcd": (_etcd_store, _etcd_reader),
}


def _backend(state: StateConfig) -> tuple[Callable[[StateConfig], StateAdmin], Callable[[StateConfig], StateReader]]:
    try:
        return BACKENDS[state.backend]
    except KeyError:
        raise StoreError(f"state backend {state.backend!r} is not one of {', '.join(BACKENDS)}") from None


def open_admin(state: StateConfig) -> StateAdmin:
    """The admin side of the store `state` configures; StoreError if it cannot be opened."""
    return _backend(state)[0](state)


def open_reader(state: StateConfig) -> StateReader:
    """The data path's side of the store `state` configures, its first snapshot loaded (this
    blocks: call it at startup, not on a running loop); StoreError if it cannot be opened."""
    return _backend(state)[1](state)


__all__ = ["BACKENDS", "AccessKey", "AlreadyExistsError", "ConflictError", "InvalidError", "NamespaceActivity", "InvalidScopeError",
           "NotFoundError", "ResolvedKey", "Snapshot", "SnapshotCallback", "StateAdmin", "StateReader", "StoreError", "Team",
           "UnavailableError", "User", "VirtualClusterInstance", "build_identity", "key_digest", "open_admin",
           "open_reader"]
