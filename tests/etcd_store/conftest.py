"""One real etcd member for the etcd store's tests; each test gets a prefix of its own."""
from __future__ import annotations

import itertools

import pytest

from fastproxy.store.etcd import EtcdStore
from tests.etcd import EtcdCluster

_prefixes = itertools.count()


@pytest.fixture(scope="session")
def etcd(tmp_path_factory):
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"))
    yield cluster
    cluster.stop()


@pytest.fixture
def etcd_config(etcd):
    return etcd.config(prefix=f"/test-{next(_prefixes)}/")


@pytest.fixture
def store(etcd_config):
    store = EtcdStore(etcd_config)
    yield store
    store.close()
