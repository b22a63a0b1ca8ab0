"""The OpenID Connect grants' store contract (tests/oidc/test_oidc_units.py) on a real etcd: a code
taken once and only as its kind, an access token read until it expires, one winner of many takers."""
from __future__ import annotations

import pytest

from fastproxy.oidc.provider import Grants
from fastproxy.store.etcd import EtcdStore
from tests.oidc import test_oidc_units

for name in ("test_a_code_is_taken_once_and_only_as_its_kind", "test_an_access_token_is_read_many_times_until_it_expires",
             "test_of_many_takers_of_one_code_exactly_one_gets_it"):
    globals()[name] = getattr(test_oidc_units, name)


@pytest.fixture
def new_store(etcd_config):
    return lambda: EtcdStore(etcd_config)


@pytest.fixture
def grants(store):
    return Grants(store)
