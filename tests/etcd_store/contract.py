"""What the etcd backend's contract modules share: which tests of tests/store are about SQLite
itself (files, migrations, connections, its generation counter), and how a module adopts the rest."""
from __future__ import annotations

from types import ModuleType
from typing import Any

SQLITE_ONLY = {
    "test_every_write_stamps_its_objects_with_the_generation_it_ends_at",  # changed_since: SQLite's poll
    "test_activity_changes_neither_the_keys_version_nor_the_generation",   # etcd has one revision for all
    "test_two_stores_on_one_file_see_and_respect_each_others_writes",
    "test_migration_gives_existing_objects_a_uid_and_a_version",
    "test_migration_4_adds_passwords_and_a_password_change_reloads_every_reader",
    "test_only_a_digest_of_the_key_is_stored",
    "test_every_identity_write_bumps_the_version_but_activity_does_not",
    "test_a_second_connection_sees_changes",
    "test_a_change_from_another_process_is_seen",
    "test_a_forked_worker_opens_its_own_connection",
    "test_schema_is_versioned_and_in_wal_mode",
    "test_a_newer_schema_is_refused",
    "test_a_snapshot_of_ten_thousand_users_loads_well_under_a_second",  # 10,000 writes: the bench's job
    "test_revoked_token_ids_reach_the_snapshot",  # SQLite keeps expired ids until the next revocation; a lease does not
}


def adopt(source: ModuleType, into: dict[str, Any]) -> None:
    """Put `source`'s store tests (and its `alice` fixture) into a module's namespace, so that the
    module's `store` fixture (conftest: an EtcdStore on a prefix of its own) replaces theirs."""
    for name, value in vars(source).items():
        if name.startswith("test_") and name not in SQLITE_ONLY or name == "alice":
            into[name] = value
