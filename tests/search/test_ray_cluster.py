"""A Ray cluster of several nodes on this machine (ray.cluster_utils.Cluster: a head with no CPUs and two 1-CPU
worker nodes), a sweep across them through `regsweep run --backend ray --address`, and one worker node killed while
it holds a running trial: that trial ends FAIL with the driver's reason naming its worker and is retried exactly once
with its params (Ray's max_failures is 0: the driver owns retries), the budget stays exact and nothing stays RUNNING.

The cluster is this test's own (not the session's local Ray); the driver is a `regsweep` subprocess.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from regsweep.search.backends.ray.driver import LOST_REASON
from regsweep.search.record import history

N_TRIALS = 2
EPOCHS = 40
# ~75 steps an epoch for 40 epochs: each trial trains for seconds, so the node dies under a running trial
SPEC = f"""
name: ray_cluster
base:
  model: {{name: cnn, widths: [4]}}
  data: {{name: synthetic, n_samples: 6000, shape: [1, 8, 8], batch_size: 64}}
  train: {{epochs: {EPOCHS}, num_threads: 1, train_eval_size: 64}}
space:
  model.dropout: {{type: float, low: 0.0, high: 0.5}}
sampler: {{name: random, seed: 0}}
pruner: none
budget: {{n_trials: {N_TRIALS}}}
"""


def _trials(name, url):
    try:
        return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    except KeyError:  # the driver has not created the study yet
        return []


def _wait_training(name, url, proc, timeout=120):
    """A trial RUNNING with a recorded epoch; else the driver's output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = [t for t in _trials(name, url) if t.state == TrialState.RUNNING and history(t)]
        if live:
            return live[0]
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    out = proc.communicate(timeout=30)[0] if proc.poll() is not None else ""
    raise AssertionError(f"no trial trained: {[(t.number, t.state.name) for t in _trials(name, url)]}; driver rc "
                         f"{proc.poll()}\n{out[-3000:]}")


def _ppid(pid):
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def _node_of(cluster_nodes, worker_pid):
    """The worker node whose raylet started ``worker_pid`` (Ray workers are children of their node's raylet)."""
    raylets = {info.process.pid: node for node in cluster_nodes for info in node.all_processes.get("raylet", [])}
    pid = worker_pid
    while pid > 1:
        if pid in raylets:
            return raylets[pid]
        pid = _ppid(pid)
    raise AssertionError(f"no worker node holds pid {worker_pid}")


@pytest.mark.ray
@pytest.mark.db
@pytest.mark.procs
def test_a_killed_ray_node_fails_its_trial_with_a_reason_and_the_driver_retries_it_once(tmp_path, postgres_url):
    from ray.cluster_utils import Cluster  # Ray missing: an ImportError, a failure (never a skip)

    spec = tmp_path / "ray_cluster.yaml"
    spec.write_text(SPEC)
    name = f"t-raycl-{uuid.uuid4().hex[:10]}"
    # the driver joins the cluster by --address alone; the rest of Ray's environment (RAY_AUTH_MODE, which the
    # session's ray.init sets in this process and the cluster's nodes inherit) must be the nodes' too
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(REGSWEEP_PROGRESS="off", REGSWEEP_RAY_RESULTS=str(tmp_path / "ray_results"), PYTHONUNBUFFERED="1")
    # the GCS declares a silent node dead after 2 missed 0.5-s health checks (Ray's default: 5 x 3 s)
    health = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 2}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": health})
    proc = None
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        argv = ["run", str(spec), "--backend", "ray", "--address", cluster.address, "--storage", postgres_url,
                "--study-name", name]
        proc = subprocess.Popen([sys.executable, "-P", "-m", "regsweep.search.cli", *argv],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        victim = _wait_training(name, postgres_url, proc)
        pid = int(victim.user_attrs["worker"].rsplit(":", 1)[1])  # "ray:HOST:PID"
        cluster.remove_node(_node_of(nodes, pid), allow_graceful=False)
        out, _ = proc.communicate(timeout=150)
    finally:
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait(timeout=10)
        cluster.shutdown()
    assert proc.returncode == 0, out[-4000:]
    trials = _trials(name, postgres_url)
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)], out[-3000:]
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == N_TRIALS  # exact budget
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [victim.number], [(t.number, t.state.name, t.user_attrs) for t in trials]
    reason = failed[0].user_attrs["stop_reason"]
    assert reason.startswith(f"{LOST_REASON} (worker {victim.user_attrs['worker']};"), reason
    retries = [t for t in trials if (t.system_attrs.get("retry_history") or [None])[-1] == victim.number]
    assert len(retries) == 1 and retries[0].params == victim.params and retries[0].state == TrialState.COMPLETE
    assert len(history(retries[0])) == EPOCHS  # the retry trained from epoch 0 to the end, recorded once each
