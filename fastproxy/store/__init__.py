"""Identity storage: users, teams, access keys and revoked token ids, read through snapshots."""
from .base import (AccessKey, ResolvedKey, Snapshot, Store, StoreError, Team, User, build_identity,
                   impersonation_headers, key_digest)
from .sqlite import SqliteStore

__all__ = ["AccessKey", "ResolvedKey", "Snapshot", "SqliteStore", "Store", "StoreError", "Team", "User",
           "build_identity", "impersonation_headers", "key_digest"]
