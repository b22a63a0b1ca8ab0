"""The worker's collector settings (server.tune_collector), in a fresh interpreter each: what a
busy worker's batches do to the collector, with and without them."""
from __future__ import annotations

import json
import subprocess
import sys

# Batches of 2,000 request-like objects, each kept until the batch is dropped (as the observers
# keep contexts until a flush), over a heap of long-lived objects; then the collections counted.
BATCHES = """
import gc, json, sys
from fastproxy.server import tune_collector
kept = [{"config": [i]} for i in range(200_000)]  # what a worker holds for good
if sys.argv[1] == "tuned":
    tune_collector()
before = [generation["collections"] for generation in gc.get_stats()]
for _ in range(100):
    batch = [[{"head": [n]}, {"route": (n,)}] for n in range(2_000)]
    del batch
after = [generation["collections"] for generation in gc.get_stats()]
print(json.dumps({"collections": [a - b for a, b in zip(after, before)], "frozen": gc.get_freeze_count()}))
"""


def collections(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", BATCHES, mode], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_a_tuned_worker_leaves_its_long_lived_objects_out_of_full_collections():
    default, tuned = collections("default"), collections("tuned")
    assert default["frozen"] == 0 and default["collections"][2] >= 1  # the long-lived heap walked again
    assert tuned["frozen"] >= 200_000  # frozen: no collection walks them
    assert tuned["collections"][2] == 0
    assert tuned["collections"][0] * 20 < default["collections"][0]  # young collections: far fewer
