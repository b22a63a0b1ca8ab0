"""argon2id password hashes and the checker that runs them off the event loop."""
from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time

import pytest

from fastproxy.auth import passwords
from fastproxy.auth.passwords import (
    CheckerBusy,
    PasswordChecker,
    PasswordError,
    check_password_text,
    hash_password,
    password_matches,
)


def test_hashes_are_argon2id_salted_and_verify():
    first, second = hash_password("correct horse"), hash_password("correct horse")
    assert first.startswith("$argon2id$v=19$m=65536,t=3,p=4$") and first != second  # a salt each
    assert password_matches(first, "correct horse") and password_matches(second, "correct horse")
    assert not password_matches(first, "correct horsE")
    assert not password_matches("not a hash", "correct horse")
    assert not password_matches("$argon2id$v=19$m=65536,t=3,p=4$broken", "correct horse")


@pytest.mark.parametrize(("password", "message"), [
    ("short", "at least 8 characters"),
    ("x" * 1025, "at most 1024 bytes"),
    ("é" * 513, "at most 1024 bytes"),
    (b"bytes ok?", "must be a string"),
    (None, "must be a string"),
])
def test_unsettable_passwords_are_refused_without_being_repeated(password, message):
    with pytest.raises(PasswordError, match=message) as refused:
        hash_password(password)
    assert str(password) not in str(refused.value) or password is None


def test_the_longest_password_allowed():
    assert check_password_text("x" * 1024) == "x" * 1024


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def hashed():
    return hash_password("correct horse")


def test_checks_run_off_the_loop_and_at_most_threads_at_once(monkeypatch, hashed):
    running, most = 0, 0
    lock = threading.Lock()
    real = passwords.password_matches

    def counting(stored: str, password: str) -> bool:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            return real(stored, password)
        finally:
            with lock:
                running -= 1
    monkeypatch.setattr(passwords, "password_matches", counting)

    async def main():
        checker = PasswordChecker(threads=2, max_waiting=10)
        lags = []

        async def ticker():  # the loop keeps turning while checks run
            while True:
                before = time.monotonic()
                await asyncio.sleep(0.005)
                lags.append(time.monotonic() - before - 0.005)
        ticking = asyncio.create_task(ticker())
        results = await asyncio.gather(*(checker.check(hashed, "correct horse" if i % 2 else "wrong")
                                         for i in range(6)))
        ticking.cancel()
        checker.close()
        return results, lags
    results, lags = run(main())
    assert results == [False, True] * 3
    assert most == 2
    # Checks on the loop would hold it for their whole run (six of tens of ms each): no ticks in between.
    assert len(lags) >= 5 and statistics.median(lags) < 0.02, lags


def test_beyond_the_bound_a_check_is_refused_at_once(hashed):

    async def main():
        checker = PasswordChecker(threads=1, max_waiting=1)
        first = asyncio.ensure_future(checker.check(hashed, "a"))
        second = asyncio.ensure_future(checker.check(hashed, "b"))
        await asyncio.sleep(0)
        with pytest.raises(CheckerBusy):
            await checker.check(hashed, "c")
        assert await first is False and await second is False
        assert checker.in_flight == 0
        assert await checker.check(hashed, "correct horse")  # room again
        checker.close()
    run(main())


def test_a_check_whose_caller_left_counts_until_it_has_run(hashed):

    async def main():
        checker = PasswordChecker(threads=1, max_waiting=0)
        task = asyncio.ensure_future(checker.check(hashed, "a"))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(CheckerBusy):  # the thread is still busy with it
            await checker.check(hashed, "b")
        while checker.in_flight:
            await asyncio.sleep(0.01)
        assert await checker.check(hashed, "correct horse")
        checker.close()
    run(main())


def test_an_unknown_user_costs_what_a_wrong_password_costs(hashed):

    async def main():
        checker = PasswordChecker(threads=1, max_waiting=4)
        await checker.check(None, "warm up")  # the dummy hash is made at start; wait for it
        times = {"wrong": [], "unknown": []}
        for _ in range(5):
            for kind, stored in (("wrong", hashed), ("unknown", None)):
                started = time.perf_counter()
                assert await checker.check(stored, "guess") is False
                times[kind].append(time.perf_counter() - started)
        checker.close()
        return statistics.median(times["wrong"]), statistics.median(times["unknown"])
    wrong, unknown = run(main())
    assert 0.7 < unknown / wrong < 1.4, (wrong, unknown)


def test_checks_run_at_a_lower_priority_than_the_loop(hashed):
    checker = PasswordChecker(threads=1, max_waiting=0)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    seen = checker.executor.submit(lambda: os.getpriority(os.PRIO_PROCESS, 0)).result(10)
    checker.close()
    assert seen == min(19, base + passwords.CHECK_NICENESS) and os.getpriority(os.PRIO_PROCESS, 0) == base
