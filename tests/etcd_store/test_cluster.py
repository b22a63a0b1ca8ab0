"""The etcd store on a three-member etcd cluster on loopback: one member lost, reads and writes go on;
two lost, the reader serves its snapshot and writes are refused as unavailable; once they return,
everything written before is there and the reader follows again."""
from __future__ import annotations

import asyncio
import time

from fastproxy.store import UnavailableError
from fastproxy.store.etcd import EtcdReader, EtcdStore
from tests.etcd import EtcdCluster
from tests.etcd_store.test_reader import off_loop, until

ELECTION = 5.0  # seconds a write may be refused while the remaining members elect a leader


async def write_soon(call, *args, **kwargs):
    """`call` once the cluster has a leader again (within ELECTION seconds)."""
    deadline = time.monotonic() + ELECTION
    while True:
        try:
            return await off_loop(call, *args, **kwargs)
        except UnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def test_one_member_lost_goes_on_two_lost_serves_the_snapshot_and_recovers(tmp_path):
    cluster = EtcdCluster(tmp_path, size=3)
    try:
        config = cluster.config(max_staleness=0)  # fail open here: what is checked is serving and recovery

        async def main():
            admin = EtcdStore(config)
            admin.create_user("alice")
            before, before_secret = admin.create_access_key(user="alice", name="before")
            reader = EtcdReader(EtcdStore(config))
            reader.start(asyncio.get_running_loop())
            try:
                cluster.kill(0)  # the member both are talking to
                one_down, one_down_secret = await write_soon(admin.create_access_key, user="alice", name="one-down")
                snapshot = await asyncio.wait_for(reader.wait_for(one_down.resource_version), ELECTION)
                assert snapshot.resolve(one_down_secret, time.time()) is not None
                assert (await off_loop(admin.get_access_key, "before")) == before

                cluster.kill(1)  # no quorum
                await until(lambda: reader.failing, what="the reader to see the cluster without a leader")
                try:
                    await off_loop(admin.create_user, "bob")
                    raise AssertionError("a write without quorum succeeded")
                except UnavailableError as error:
                    assert "etcd is unreachable" in str(error)
                for secret in (before_secret, one_down_secret):
                    assert reader.snapshot.resolve(secret, time.time()) is not None

                cluster.start(0)
                cluster.start(1)
                bob = await write_soon(admin.create_user, "bob")
                snapshot = await asyncio.wait_for(reader.wait_for(bob.resource_version), ELECTION)
                assert not reader.failing
                assert sorted(snapshot.users) == ["alice", "bob"]
                assert sorted(snapshot.access_keys) == ["before", "one-down"]
                assert sorted(key.name for key in await off_loop(admin.list_access_keys)) == ["before", "one-down"]
            finally:
                reader.close()
                admin.close()
        asyncio.run(main())
    finally:
        cluster.stop()
