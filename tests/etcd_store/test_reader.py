"""The etcd reader on a real etcd: a watch applied change by change, a reload after a compaction,
serving the last snapshot while etcd cannot be reached, refusing keys after max_staleness, and
activity coalesced into few writes."""
from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from fastproxy.store import UnavailableError
from fastproxy.store.etcd import EtcdReader, EtcdStore, Link, link_after
from tests.etcd import Link as Relay


async def until(predicate, timeout=10.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def off_loop(call, *args, **kwargs):
    return asyncio.get_running_loop().run_in_executor(None, lambda: call(*args, **kwargs))


@pytest.fixture
def admin(etcd_config):
    admin = EtcdStore(etcd_config)
    admin.create_user("alice")
    yield admin
    admin.close()


@pytest.fixture
def relay(etcd):
    relay = Relay(etcd.client_ports[0])
    yield relay
    relay.close()


def test_link_states_follow_contact_and_staleness():
    assert link_after(Link.UNREACHABLE, 0, 60) is Link.WATCHING
    assert link_after(Link.WATCHING, 1, 60) is Link.UNREACHABLE
    assert link_after(Link.UNREACHABLE, 60, 60) is Link.STALE
    assert link_after(Link.STALE, 0, 60) is Link.WATCHING
    assert link_after(Link.UNREACHABLE, 10**6, 0) is Link.UNREACHABLE  # max_staleness 0: never refuse


def test_the_snapshot_follows_each_change_without_reloading(admin, etcd_config):
    async def main():
        reader = EtcdReader(EtcdStore(etcd_config))
        published = []
        reader.subscribe(published.append)
        reader.start(asyncio.get_running_loop())
        try:
            key, secret = await off_loop(admin.create_access_key, user="alice", name="k")
            snapshot = await asyncio.wait_for(reader.wait_for(key.resource_version), 5)
            assert snapshot.resolve(secret, time.time()).identity.user == "alice"
            assert snapshot.access_keys["k"] == key
            team = await off_loop(admin.create_team, "ops", members=["alice"], groups=["admins"])
            snapshot = await asyncio.wait_for(reader.wait_for(team.resource_version), 5)
            assert "admins" in snapshot.resolve(secret, time.time()).identity.groups
            gone = await off_loop(admin.delete_access_key, "k")
            snapshot = await asyncio.wait_for(reader.wait_for(gone.resource_version), 5)
            assert snapshot.resolve(secret, time.time()) is None and "k" not in snapshot.access_keys
            assert [s.version for s in published] == [key.resource_version, team.resource_version, gone.resource_version]
            assert reader.reloads == 0 and not reader.failing
        finally:
            reader.close()
    asyncio.run(main())


def test_another_gateways_activity_copies_no_key_and_a_revocation_names_its_key(admin, etcd_config):
    async def main():
        reader = EtcdReader(EtcdStore(etcd_config))
        reader.start(asyncio.get_running_loop())
        try:
            key, _ = await off_loop(admin.create_access_key, user="alice", name="k")
            before = await asyncio.wait_for(reader.wait_for(key.resource_version), 5)
            await off_loop(admin.record_activity, {"k": time.time()})  # what another gateway's flush writes
            await until(lambda: reader.snapshot.version > before.version, what="the activity's watch event")
            after = reader.snapshot
            assert after.keys is before.keys and after.access_keys is before.access_keys and after.users is before.users
            assert after.revoked_tokens is before.revoked_tokens and after.activities is before.activities
            assert after.key_changes.base() is before and after.key_changes.names == frozenset()
            gone = await off_loop(admin.delete_access_key, "k")
            revoked = await asyncio.wait_for(reader.wait_for(gone.resource_version), 5)
            assert revoked.key_changes.base() is after and revoked.key_changes.names == {"k"}
            assert "k" not in revoked.access_keys and "k" in after.access_keys  # the old snapshot left as it was
        finally:
            reader.close()
    asyncio.run(main())


def test_the_snapshot_follows_virtual_cluster_instances(admin, etcd_config):
    async def main():
        reader = EtcdReader(EtcdStore(etcd_config))
        reader.start(asyncio.get_running_loop())
        try:
            created = await off_loop(admin.create_virtual_cluster_instance, "team-a", "vc1", cluster="prod")
            snapshot = await asyncio.wait_for(reader.wait_for(created.resource_version), 5)
            assert snapshot.virtual_cluster_instances == {("team-a", "vc1"): created}
            gone = await off_loop(admin.delete_virtual_cluster_instance, "team-a", "vc1")
            snapshot = await asyncio.wait_for(reader.wait_for(gone.resource_version), 5)
            assert snapshot.virtual_cluster_instances == {} and reader.reloads == 0
        finally:
            reader.close()
    asyncio.run(main())


def test_a_watch_behind_a_compaction_reloads_once_and_ends_consistent(admin, etcd_config, relay):
    first, first_secret = admin.create_access_key(user="alice", name="first")

    async def main():
        reader = EtcdReader(EtcdStore(dataclasses.replace(etcd_config, endpoints=(relay.endpoint,))))
        reader.start(asyncio.get_running_loop())
        try:
            relay.cut()
            await until(lambda: reader.failing, what="the reader to notice")
            assert reader.snapshot.resolve(first_secret, time.time()) is not None  # served from the snapshot
            second, second_secret = await off_loop(admin.create_access_key, user="alice", name="second")
            await off_loop(admin.delete_access_key, "first")
            await off_loop(admin.update_user, "alice", groups=["devs"])
            revision = admin.load_state().revision
            await off_loop(admin.client.call, "kv/compaction", {"revision": str(revision), "physical": True})
            relay.restore()
            await until(lambda: not reader.failing and reader.snapshot.version >= revision, what="the reload")
            snapshot = reader.snapshot
            assert reader.reloads == 1, f"{reader.reloads} reloads"
            assert snapshot.resolve(first_secret, time.time()) is None
            assert snapshot.resolve(second_secret, time.time()).identity.groups[0] == "devs"
            assert sorted(snapshot.access_keys) == ["second"]
            latest, _ = await off_loop(admin.create_access_key, user="alice", name="after")
            await asyncio.wait_for(reader.wait_for(latest.resource_version), 5)  # watching again
        finally:
            reader.close()
    asyncio.run(main())


def test_unreachable_etcd_serves_the_snapshot_then_refuses_keys_after_max_staleness(admin, etcd_config, relay):
    _, secret = admin.create_access_key(user="alice", name="k")
    cut_off = dataclasses.replace(etcd_config, endpoints=(relay.endpoint,), max_staleness=1.5, timeout=0.5)

    async def main():
        reader = EtcdReader(EtcdStore(cut_off))
        writer = EtcdStore(cut_off)
        reader.start(asyncio.get_running_loop())
        try:
            relay.cut()
            await until(lambda: reader.link is Link.UNREACHABLE, what="unreachable")
            assert reader.failing and reader.snapshot.resolve(secret, time.time()) is not None
            with pytest.raises(UnavailableError, match="etcd is unreachable"):
                await off_loop(writer.create_user, "bob")
            await until(lambda: reader.link is Link.STALE, what="stale")
            assert reader.snapshot.resolve(secret, time.time()) is None  # fail closed
            assert "k" in reader.snapshot.access_keys  # the objects stay listed
            relay.restore()
            await until(lambda: reader.link is Link.WATCHING, what="reconnection")
            assert reader.snapshot.resolve(secret, time.time()) is not None and not reader.failing
            assert (await off_loop(writer.create_user, "bob")).name == "bob"
        finally:
            reader.close()
            writer.close()
    asyncio.run(main())


KEYS = 130  # more than one activity transaction holds (TXN_KEYS)


def test_activity_is_coalesced_and_only_moves_forward(admin, etcd_config):
    for number in range(KEYS):
        admin.create_access_key(user="alice", name=f"k{number}")
    admin.record_activity({"k0": 2_000_000_000.0})

    async def main():
        reader = EtcdReader(EtcdStore(etcd_config))
        reader.start(asyncio.get_running_loop())
        for second in range(1000):
            reader.record_activity({f"k{number}": 1_800_000_000.0 + second for number in range(KEYS)})
        reader.close()  # writes what is pending
        return reader.writes
    assert asyncio.run(main()) == 1
    keys = {key.name: key.last_activity for key in admin.list_access_keys()}
    assert keys["k0"] == 2_000_000_000.0  # newer than what was written
    assert {keys[f"k{number}"] for number in range(1, KEYS)} == {1_800_000_999.0}
