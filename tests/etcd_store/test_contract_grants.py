"""The OpenID Connect grants' store contract (tests/oidc/test_oidc_units.py) on a real etcd: a code
taken once and only as its kind, an access token read until it expires, one winner of many takers."""
from __future__ import annotations

import threading

import pytest

from fastproxy.oidc.provider import Grants
from fastproxy.store.etcd import EtcdStore
from tests.oidc import test_oidc_units
from tests.oidc.test_oidc_units import CODE, GRANT

test_a_code_is_taken_once_and_only_as_its_kind = test_oidc_units.test_a_code_is_taken_once_and_only_as_its_kind
test_an_access_token_is_read_many_times_until_it_expires = \
    test_oidc_units.test_an_access_token_is_read_many_times_until_it_expires


@pytest.fixture
def grants(store):
    return Grants(store)


def test_of_many_takers_of_one_code_exactly_one_gets_it(grants, etcd_config):
    grants.put(CODE, "raced", GRANT, 60)
    stores = [Grants(EtcdStore(etcd_config)) for _ in range(8)]  # each its own connection
    got: list = []
    start = threading.Barrier(len(stores))

    def take(each: Grants) -> None:
        start.wait()
        got.append(each.take(CODE, "raced"))

    threads = [threading.Thread(target=take, args=(each,)) for each in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert got.count(GRANT) == 1 and got.count(None) == len(stores) - 1
    for each in stores:
        each.store.close()
