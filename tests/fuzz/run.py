"""Coverage-guided fuzzing of one target with atheris (libFuzzer): the gateway's modules are
instrumented, the target's corpus seeds the run, and libFuzzer's own flags follow the target:

    python -m tests.fuzz.run TARGET [libFuzzer flags] [corpus folders]

A crash is written where -artifact_prefix says (scripts/test: tests/fuzz/crashes/TARGET/),
and from there test_replay.py replays it on every run.
"""
from __future__ import annotations

import logging
import sys

import atheris

with atheris.instrument_imports(include=["fastproxy"]):
    from tests.fuzz.harness import TARGETS, Harness


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else ""
    if name not in TARGETS:
        sys.exit(f"fuzz target: expected one of {', '.join(TARGETS)}, got {name!r}")
    logging.disable(logging.CRITICAL)  # the gateway logs every invalid response it refuses
    harness, target = Harness(), TARGETS[name]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], lambda data: target(harness, data))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
