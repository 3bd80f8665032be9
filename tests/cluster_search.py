"""A search on a ``ray.cluster_utils.Cluster`` whose worker nodes join and leave mid-search.

Run by tests/test_search_faults.py as ``RAY_TMPDIR=... python tests/cluster_search.py WORKDIR``:
a Cluster starts its own Ray, which cannot share a process with the test session's, and a
private ``RAY_TMPDIR`` keeps other processes' ``ray.init()`` from finding it.

The head node has no CPU, so trials run only on the nodes that join: node A joins once the
search has started and takes the first trial; node B joins while that trial runs, then A is
removed mid-trial, so the trial is retried on B and the search goes on there. Prints one JSON
line with what happened, for the test to check.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from autodropout.errors import NotFound
from controller.service import SearchOptions, run_search
from patterns_db import PatternStore
from patterns_db.states import TrialState

NAME = "cluster"
TRIALS = 2
EPOCHS = 20  # epochs of tiny training outlast adding node B, so A goes mid-trial
TIMEOUT_S = 120.0


def trial_statuses(db: str) -> list[str]:
    with PatternStore(db) as store:
        try:
            return [record.status for record in store.trials(NAME)]
        except NotFound:  # the search has not started yet
            return []


def search_started(db: str) -> bool:
    with PatternStore(db) as store:
        return any(summary.search.name == NAME for summary in store.searches())


def wait_for(condition, what: str, searching: threading.Thread, outcome: dict) -> None:
    """Poll ``condition``; fail at once, with the search's outcome, if the search ended."""
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if not searching.is_alive():
            raise RuntimeError(f"the search ended before {what}: {outcome['status']}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what} (search: {outcome['status']})")
        time.sleep(0.2)


def main(workdir: Path) -> None:
    db = f"sqlite:///{workdir / 'patterns.db'}"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    options = SearchOptions(space="tiny", dataset="synthetic", trials=TRIALS, concurrent=2,
                            epochs=EPOCHS, address=cluster.address, db=db, name=NAME,
                            experiments_dir=str(workdir / "experiments"), progress=False)
    outcome: dict = {"status": "still running"}

    def search() -> None:
        try:
            outcome["status"] = run_search(options).status
        except BaseException as error:  # reported to the test, which fails on it
            outcome["status"] = f"{type(error).__name__}: {error}"

    searching = threading.Thread(target=search, daemon=True)
    searching.start()
    try:
        wait_for(lambda: search_started(db), "the search to start", searching, outcome)
        node_a = cluster.add_node(num_cpus=1)
        wait_for(lambda: TrialState.RUNNING in trial_statuses(db), "a trial on node A", searching,
                 outcome)
        cluster.add_node(num_cpus=1)
        cluster.remove_node(node_a)  # the trial on A has epochs to go
        outcome["removed_while"] = trial_statuses(db)
        searching.join(TIMEOUT_S)
    finally:
        outcome["trials"] = trial_statuses(db)
        print(json.dumps(outcome), flush=True)
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
