"""The loopback Slurm test cluster behaves like a real one: warning signals, self-requeue, srun over
two nodes.

These tests install Debian's slurm-wlm + munge when missing; they skip (and say why) only where
that is impossible (no apt, not root). Measured here: signal ~0-30 s after start (slurmctld checks
time limits every 30 s), requeue to restart ~2 s with release_now.
"""
from __future__ import annotations

import os
import re
import socket
import textwrap
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import (
    SlurmCluster, cluster_processes, ensure_slurm_installed, slurm_cluster,
)

pytestmark = pytest.mark.slow

TIME_LIMIT_S = 60  # --time=1
WARNING_S = 50     # --signal=B:USR1@50: due 10 s after start, sent at slurmctld's next 30 s check

REQUEUE_SCRIPT = textwrap.dedent(f"""\
    #!/bin/bash
    #SBATCH --requeue
    #SBATCH --signal=B:USR1@{WARNING_S}
    #SBATCH --time=1
    #SBATCH --open-mode=append
    restart=${{SLURM_RESTART_COUNT:-0}}
    echo "run $restart started $(date +%s.%N)"
    if [ "$restart" -ge 1 ]; then echo "done"; exit 0; fi
    got_usr1=0
    trap 'got_usr1=1' USR1
    # `wait` returns as soon as a trapped signal arrives; a foreground sleep would delay the trap.
    while [ "$got_usr1" = 0 ]; do sleep 1 & wait $!; done
    echo "USR1 received $(date +%s.%N)"
    echo "requeue requested $(date +%s.%N)"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
""")


def _skip_unless_slurm_possible() -> None:
    reason = ensure_slurm_installed()
    if reason:
        pytest.skip(f"no Slurm test cluster on this machine: {reason}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> SlurmCluster:
    """Two nodes (two slurmd on this machine); jobs without --nodes get one of them."""
    _skip_unless_slurm_possible()
    with slurm_cluster(tmp_path_factory.mktemp("slurm"), cpus=2, nodes=2) as running:
        yield running


def _stamp(lines: list[str], prefix: str) -> float:
    matches = [line for line in lines if line.startswith(prefix)]
    assert len(matches) == 1, f"expected one line starting {prefix!r}, got {lines}"
    return float(matches[0].split()[-1])


def test_srun_on_two_nodes_starts_ranks_in_blocks_and_the_first_host_resolves(cluster, tmp_path):
    script = tmp_path / "ranks.sh"
    script.write_text(textwrap.dedent("""\
        #!/bin/bash
        #SBATCH --nodes=2
        #SBATCH --ntasks-per-node=2
        echo "first host $(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
        srun bash -c 'echo "rank $SLURM_PROCID of $SLURM_NTASKS on node $SLURM_NODEID $SLURMD_NODENAME"'
    """))
    output = tmp_path / "ranks.out"

    job_id = cluster.sbatch(script, options=[f"--output={output}"], cwd=tmp_path)

    assert cluster.wait(job_id, timeout_s=60) == "COMPLETED", output.read_text()
    first, second = cluster.nodes
    assert sorted(output.read_text().splitlines()) == [
        f"first host {first}", f"rank 0 of 4 on node 0 {first}", f"rank 1 of 4 on node 0 {first}",
        f"rank 2 of 4 on node 1 {second}", f"rank 3 of 4 on node 1 {second}"]
    # what pipeline/train/launch_env.py makes the master address of srun's ranks
    assert socket.gethostbyname(first) == "127.0.0.1"


def test_fake_gpus_let_a_gpu_header_run_on_a_cpu_machine(tmp_path):
    _skip_unless_slurm_possible()
    script = tmp_path / "gpus.sh"
    script.write_text(textwrap.dedent("""\
        #!/bin/bash
        #SBATCH --gpus-per-node=2
        #SBATCH --cpus-per-gpu=1
        srun --ntasks-per-node=2 bash -c 'echo "rank $SLURM_PROCID gpus $SLURM_GPUS_PER_NODE"'
    """))
    output = tmp_path / "gpus.out"

    with slurm_cluster(tmp_path / "cluster", cpus=2, gpus=2) as running:
        job_id = running.sbatch(script, options=[f"--output={output}"], cwd=tmp_path)
        assert running.wait(job_id, timeout_s=60) == "COMPLETED", output.read_text()

    assert sorted(output.read_text().splitlines()) == ["rank 0 gpus 2", "rank 1 gpus 2"]


def test_leaving_the_cluster_stops_its_daemons_and_running_jobs(tmp_path):
    _skip_unless_slurm_possible()
    script = tmp_path / "sleeper.sh"
    pid_file = tmp_path / "sleeper.pid"
    script.write_text(f"#!/bin/bash\necho $$ > {pid_file}\nsleep 600\n")

    with slurm_cluster(tmp_path / "cluster", nodes=2) as running:
        running.sbatch(script, options=["--output=/dev/null"], cwd=tmp_path)
        deadline = time.monotonic() + 300  # a hang guard: the wait is on the job's pid file
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pid_file.exists(), running.log_tails()
        daemon_pids = [int((running.root / f"{daemon}.pid").read_text())
                       for daemon in ("slurmctld", *(f"slurmd-{node}" for node in running.nodes))]

    for pid in [*daemon_pids, int(pid_file.read_text())]:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"pid {pid} survived"
    assert [pid for pid in cluster_processes(running.conf_path) if not _is_zombie(pid)] == []


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True  # gone while we looked


def test_slurm_commands_use_the_private_conf_not_the_system_one(cluster):
    assert cluster.env["SLURM_CONF"] == str(cluster.conf_path)
    shown = cluster.run("scontrol", "show", "config").stdout
    assert f"SLURM_CONF              = {cluster.conf_path}" in shown
    assert "ClusterName             = tgatest" in shown
    assert os.environ.get("SLURM_CONF") != str(cluster.conf_path)


# Last in the module: slurmctld checks time limits, and so sends the warning, every 30 s counted from
# its start; the tests above use up part of the 30 s this job would otherwise wait on a new cluster.
def test_job_gets_warning_signal_requeues_itself_and_its_second_run_completes(cluster, tmp_path):
    script = tmp_path / "requeue.sh"
    script.write_text(REQUEUE_SCRIPT)
    output = tmp_path / "job.out"

    job_id = cluster.sbatch(script, options=[f"--output={output}"], cwd=tmp_path)
    state = cluster.wait(job_id, timeout_s=150)  # releases the requeued job at once

    # Slurm may add its own "slurmstepd: *** JOB n ... CANCELLED ... DUE TO JOB REQUEUE ***".
    lines = [line for line in output.read_text().splitlines() if not line.startswith("slurmstepd")]
    assert state == "COMPLETED", f"job ended {state}; output:\n{lines}\n{cluster.log_tails()}"
    assert cluster.restart_count(job_id) == 1
    # Append mode: the file holds the first run (signal, requeue) followed by the second.
    assert [re.sub(r" [0-9.]+$", "", line) for line in lines] == [
        "run 0 started", "USR1 received", "requeue requested", "run 1 started", "done"]
    signal_delay_s = _stamp(lines, "USR1 received") - _stamp(lines, "run 0 started")
    restart_delay_s = _stamp(lines, "run 1 started") - _stamp(lines, "requeue requested")
    print(f"signal {signal_delay_s:.1f} s after start, "
          f"restart {restart_delay_s:.1f} s after requeue")
    assert signal_delay_s < TIME_LIMIT_S
    # Without release_now the requeued job would wait cred_expire (30 s) before it may start.
    assert restart_delay_s < 30
