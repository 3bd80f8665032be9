"""Faults during a search on a real Ray: a killed worker, a killed driver, nodes that come and go.

Each scenario checks what a user relies on afterwards: the search finishes, and the pattern
store holds every trial exactly once, with the controller having learned from each completed
trial exactly once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cluster_search import EPOCHS

from autodropout.cli import main
from autodropout.errors import NotFound
from controller.callbacks import StoreCallback
from controller.controllers import deserialize_state
from patterns_db import PatternStore

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TESTS_DIR = Path(__file__).parent


@pytest.fixture
def search(tmp_path):
    """``autodropout search`` arguments for a tiny search on synthetic data in ``tmp_path``."""
    db = f"sqlite:///{tmp_path / 'patterns.db'}"
    experiments = tmp_path / "experiments"

    def args(*extra: str) -> list[str]:
        return ["search", "--space", "tiny", "--dataset", "synthetic", "--db", db,
                "--experiments-dir", str(experiments), "--quiet", *extra]

    args.db = db
    args.experiments = experiments
    return args


def observed_rewards(store: PatternStore, name: str) -> int:
    """How many rewards the search's RL controller has learned from (``update_every`` is 1)."""
    return deserialize_state(store.load_controller_state(name))["updates"]


def assert_each_trial_once(store: PatternStore, name: str, trials: int) -> list:
    records = store.trials(name)
    assert len(records) == trials
    assert len({record.trial_id for record in records}) == trials
    assert {record.status for record in records} == {"completed"}
    for record in records:  # the history of the attempt that counts, each epoch once
        assert [step["step"] for step in record.metrics] == list(range(1, len(record.metrics) + 1))
        assert record.metrics[-1]["reward"] == record.reward
    assert store.get_search(name).status == "completed"
    assert observed_rewards(store, name) == trials
    return records


def test_worker_killed_mid_trial_is_retried_and_recorded_once(ray_session, search, monkeypatch):
    """SIGKILL the worker of the first trial that reports epoch 1 of 3: Tune retries it
    (``max_failures=1``) from the start, and the store keeps the retried attempt only."""
    killed: dict[str, int] = {}
    record_result = StoreCallback.on_trial_result

    def kill_first_worker(self, iteration, trials, trial, result, **info):
        record_result(self, iteration, trials, trial, result, **info)
        if not killed and result["epoch"] == 1:
            # The worker waits in tune.report until the driver asks for epoch 2: mid-trial.
            killed[trial.trial_id] = result["pid"]
            os.kill(result["pid"], signal.SIGKILL)

    monkeypatch.setattr(StoreCallback, "on_trial_result", kill_first_worker)
    assert main(search("--trials", "3", "--concurrent", "2", "--epochs", "3",
                       "--name", "killed-worker")) == 0

    [(trial_id, pid)] = killed.items()
    with PatternStore(search.db) as store:
        records = assert_each_trial_once(store, "killed-worker", 3)
    retried = next(record for record in records if record.trial_id == trial_id)
    assert len(retried.metrics) == 3
    reports = worker_pids(search.experiments / "killed-worker", trial_id)
    assert reports[0] == pid and reports[1:] == [reports[-1]] * 3 and reports[-1] != pid


def worker_pids(experiment: Path, trial_id: str) -> list[int]:
    """The worker process of each report of a trial, in order (from Tune's result.json)."""
    [result_file] = experiment.glob(f"*_{trial_id}_*/result.json")
    lines = result_file.read_text().splitlines()
    return [json.loads(line)["pid"] for line in lines if line.strip()]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def trial_counts(db: str, name: str) -> dict[str, int]:
    with PatternStore(db) as store:
        try:
            return store.search_summary(name).trial_counts
        except NotFound:  # the driver has not created the search yet
            return {}


def mid_search(db: str, name: str) -> bool:
    """2 trials completed and one that started after them is running (recorded after Tune's
    last periodic save of the experiment, unless the service saves it often enough)."""
    counts = trial_counts(db, name)
    return counts.get("completed", 0) >= 2 and counts.get("running", 0) >= 1


def test_driver_killed_mid_search_resumes_without_duplicates(ray_session, search, tmp_path):
    """SIGKILL the driver once 2 of 5 trials are completed and a third is running;
    ``--resume NAME`` finishes the search."""
    address = ray_session.get_runtime_context().gcs_address
    # The session's Ray uses token authentication (Ray's default for a new local cluster):
    # ray.init set RAY_AUTH_MODE=token in os.environ, and a driver joining by address needs it
    # too (with the token from ~/.ray/auth_token, or RAY_AUTH_TOKEN), so the env is passed on.
    log = tmp_path / "driver.log"
    with log.open("w") as output:
        driver = subprocess.Popen(
            [sys.executable, "-m", "autodropout", *search("--trials", "5", "--concurrent", "2",
                                                           "--epochs", "3", "--name", "resumed",
                                                           "--address", address)],
            stdout=output, stderr=subprocess.STDOUT, env=os.environ.copy(),
        )
        try:
            wait_for(lambda: mid_search(search.db, "resumed") or driver.poll() is not None,
                     timeout=120, what="2 completed trials and a running one")
            assert driver.poll() is None, log.read_text()[-3000:]
        finally:
            driver.kill()
            driver.wait()

    assert main(["search", "--resume", "resumed", "--db", search.db,
                 "--experiments-dir", str(search.experiments), "--quiet"]) == 0
    with PatternStore(search.db) as store:
        assert_each_trial_once(store, "resumed", 5)


def test_nodes_join_and_leave_mid_search(tmp_path):
    """On a Cluster whose head has no CPU, node A joins the running search and takes a trial,
    node B joins, and A is removed mid-trial: the trial is retried on B, the search completes."""
    ray_dir = tempfile.mkdtemp(prefix="adray")  # short: Ray's socket paths must fit 107 bytes
    try:
        run = subprocess.run([sys.executable, str(TESTS_DIR / "cluster_search.py"), str(tmp_path)],
                             env={**os.environ, "RAY_TMPDIR": ray_dir}, cwd=TESTS_DIR.parent,
                             capture_output=True, text=True, timeout=240)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-3000:]
    outcome = json.loads(run.stdout.splitlines()[-1])
    assert outcome["status"] == "completed", run.stderr[-3000:]
    assert outcome["removed_while"] == ["running"]
    with PatternStore(f"sqlite:///{tmp_path / 'patterns.db'}") as store:
        first = assert_each_trial_once(store, "cluster", 2)[0]
    pids = worker_pids(tmp_path / "experiments" / "cluster", first.trial_id)
    on_a, on_b = pids[0], pids[-1]
    killed_at = pids.index(on_b)  # reports on A before it went, then all epochs on B
    assert 1 <= killed_at < EPOCHS and pids == [on_a] * killed_at + [on_b] * EPOCHS
