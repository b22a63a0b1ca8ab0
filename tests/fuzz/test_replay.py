"""Every seed and every crash the fuzzer ever found, replayed through its target: the corpus
stays a regression suite, and a fixed crash stays fixed."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz.harness import TARGETS, Harness

HERE = Path(__file__).parent
CASES = sorted(path for folder in ("corpus", "crashes") for path in (HERE / folder).glob("*/*")
               if path.parent.name in TARGETS)


@pytest.fixture(scope="module")
def harness():
    harness = Harness()
    yield harness
    harness.close()


def test_every_target_has_seeds():
    assert {path.parent.name for path in CASES if path.parts[-3] == "corpus"} == set(TARGETS)


@pytest.mark.parametrize("case", CASES, ids=lambda path: f"{path.parts[-3]}/{path.parent.name}/{path.name}")
def test_a_case_runs_clean(harness, case):
    TARGETS[case.parent.name](harness, case.read_bytes())
