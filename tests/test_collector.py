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


# A tuned worker's reload: garbage in cycles among the frozen objects (the old configuration's)
# is freed by refreeze_collector, and what is still alive stays frozen.
RELOAD = """
import gc, json, weakref
from fastproxy.server import refreeze_collector, tune_collector
class Old:
    pass
old = Old()
old.cycle = old  # freed by the collector alone, never by reference counting
gone = weakref.ref(old)
kept = [Old() for _ in range(1_000)]
tune_collector()
del old
gc.collect()
frozen_garbage = gone() is not None
refreeze_collector()
print(json.dumps({"kept_frozen_garbage": frozen_garbage, "freed": gone() is None, "frozen": gc.get_freeze_count()}))
"""


def test_a_reload_frees_the_old_configurations_garbage_and_refreezes_the_rest():
    done = subprocess.run([sys.executable, "-c", RELOAD], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    assert result["kept_frozen_garbage"]  # frozen, a cycle outlives gc.collect() ...
    assert result["freed"]  # ... until the reload thaws it
    assert result["frozen"] >= 1_000


def test_an_untuned_process_is_left_as_it_is():
    done = subprocess.run([sys.executable, "-c", "import gc, json\nfrom fastproxy.server import refreeze_collector\n"
                           "refreeze_collector()\nprint(json.dumps([gc.get_freeze_count(), gc.get_threshold()]))"],
                          capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == [0, [700, 10, 10]]
