"""The store contract the SQLite backend's tests set out, run against the etcd backend on a real etcd.

The tests are those of tests/store, imported here so that this module's `store` fixture (conftest:
an EtcdStore on a prefix of its own) replaces theirs; those about SQLite itself (files, migrations,
connections, its generation counter) are left out.
"""
from __future__ import annotations

from tests.store import test_sqlite

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

for name, value in vars(test_sqlite).items():
    if name.startswith("test_") and name not in SQLITE_ONLY or name == "alice":
        globals()[name] = value
