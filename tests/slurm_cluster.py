"""A real Slurm cluster on loopback, private to one test (see launch/slurm/README.md).

One node, or several: one slurmd per node on this machine, each with its own loopback address and
port (Debian's build has MULTIPLE_SLURMD: `scontrol show config`). Everything the cluster owns lives under one folder:
slurm.conf, munge key and socket, state, spool, logs. Ports are picked free at start and every
Slurm command gets `SLURM_CONF` through `SlurmCluster.env`, so a system Slurm (its /etc/slurm, its
munged, its daemons on 6817/6818) is neither read nor disturbed.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SLURM_PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "squeue", "srun", "scancel")
FINISHED_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE", "PREEMPTED",
})
# Debian puts the daemons in /usr/sbin, which a non-login root shell may lack on PATH.
SBIN_DIRS = ("/usr/sbin", "/sbin")


class SlurmClusterError(RuntimeError):
    """The cluster did not start or a job missed its expected state; the message has log tails."""


def _which(program: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    return shutil.which(program, path=path)


def _missing_programs() -> list[str]:
    return [p for p in (*DAEMONS, *CLIENTS) if _which(p) is None]


def ensure_slurm_installed() -> str | None:
    """None when a test cluster can run (installing Slurm + munge with apt if needed), else why not.

    Root is needed either way: the daemons run as SlurmUser=root.
    """
    missing = _missing_programs()
    if os.geteuid() != 0:
        return "the Slurm test cluster needs root (daemons run as SlurmUser=root)" + (
            f"; also missing: {', '.join(missing)}" if missing else "")
    if not missing:
        return None
    if _which("apt-get") is None:
        return f"Slurm programs missing ({', '.join(missing)}) and apt-get is not available"
    # Debian's postinst would start system daemons where an init system runs; policy-rc.d 101
    # forbids that so the only Slurm daemons on the machine are the ones a test starts.
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    policy = Path("/usr/sbin/policy-rc.d")
    wrote_policy = not policy.exists()
    if wrote_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        for cmd in (["apt-get", "update"],
                    ["apt-get", "install", "-y", "--no-install-recommends",
                     "-o", "DPkg::Lock::Timeout=300", *SLURM_PACKAGES]):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                error = done.stderr.strip()[-2000:]
                return f"`{' '.join(cmd)}` failed ({done.returncode}): {error}"
    finally:
        if wrote_policy:
            policy.unlink()
    still_missing = _missing_programs()
    if still_missing:
        return f"installed {SLURM_PACKAGES} but still missing: {', '.join(still_missing)}"
    return None


def node_names(nodes: int) -> list[str]:
    """One node is `localhost`. Several are named by their loopback addresses (127.0.0.1,
    127.0.0.2, ...; Linux routes all of 127/8 to `lo`): a rank's master address is the first host
    of the job's node list, which must resolve as node names do through DNS on a real cluster, and
    an address resolves anywhere without touching /etc/hosts. (Slurm cannot call one of several
    nodes `localhost`: while it holds one node record named so, its lookup of any other name
    answers that record, and the second node reads as a duplicate.)"""
    if nodes == 1:
        return ["localhost"]
    return [f"127.0.0.{index + 1}" for index in range(nodes)]


def _free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that nothing listens on (all probes stay open until all are picked)."""
    with contextlib.ExitStack() as probes:
        ports = []
        for _ in range(count):
            probe = probes.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
        return ports


def _socket_dir(tmp_dir: Path) -> Path:
    """A folder for Unix sockets: munged's and slurmd's per-step ones must fit in 108 bytes."""
    if len(str(tmp_dir)) <= 60:
        return tmp_dir
    return Path(tempfile.mkdtemp(prefix="slurm-"))


def _slurm_conf(root: Path, sockets: Path, nodes: list[str], cpus: int, memory_mb: int, gpus: int,
                controller_port: int, node_ports: list[int]) -> str:
    gres = f" Gres=gpu:{gpus}" if gpus else ""
    # Several slurmd on one machine: each is started as its node (slurmd -N), listens on its own
    # Port (a slurmd binds every address), and has its own spool, pid and log files (%n: node name).
    # slurmctld and srun reach a node at its NodeAddr: the name itself where it is an address.
    node_lines = [f"NodeName={name} NodeAddr={'127.0.0.1' if name == 'localhost' else name} Port={port} "
                  f"CPUs={cpus} RealMemory={memory_mb}{gres} State=UNKNOWN"
                  for name, port in zip(nodes, node_ports)]
    return "\n".join([
        f"# Written by tests/slurm_cluster.py: {len(nodes)} node(s) on loopback, private to one test.",
        "ClusterName=tgatest",
        "SlurmctldHost=localhost",
        f"SlurmctldPort={controller_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire is also how long a requeued job waits before it may start again (default
        # 120 s); SlurmCluster.release_now skips even that wait.
        f"AuthInfo=socket={sockets / 'munge.socket'},cred_expire=30",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={sockets / 'spool' / '%n'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        # No cgroups in a container: track job processes through /proc, bind nothing.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        f"DefMemPerCPU={max(1, memory_mb // cpus)}",
        # A node may be declared bigger than the machine (e.g. 4 ranks on 2 cores).
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        "JobRequeue=1",
        # Keep finished jobs queryable by scontrol for 2 minutes (no slurmdbd, so no sacct).
        "MinJobAge=120",
        "KillWait=5",
        "SchedulerType=sched/builtin",
        "SchedulerParameters=sched_interval=2",
        *(["GresTypes=gpu"] if gpus else []),
        *node_lines,
        f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def _fake_gpu_gres(root: Path, nodes: list[str], gpus: int) -> None:
    """gres.conf (read next to slurm.conf) with `gpus` device-less GPUs.

    gres/gpu drops entries without File and rejects regular files, so each "GPU" is a link to
    /dev/null named like a real device (Slurm derives the CUDA_VISIBLE_DEVICES index from it).
    """
    devices = root / "fake-gpus"
    devices.mkdir(exist_ok=True)
    for index in range(gpus):
        link = devices / f"nvidia{index}"
        if not link.is_symlink():
            link.symlink_to("/dev/null")
    (root / "gres.conf").write_text(
        f"NodeName={','.join(nodes)} Name=gpu File={devices}/nvidia[0-{gpus - 1}]\n")


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"--- {path.name}: (missing)"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- {path.name} (last {len(text)} lines):\n" + "\n".join(text)


@dataclass
class SlurmCluster:
    """A running test cluster; every Slurm command must run with `env` (it carries SLURM_CONF)."""

    root: Path
    conf_path: Path
    env: dict[str, str]
    nodes: list[str]  # node names in slurm.conf order: srun's task 0 runs on the first
    _released: dict[str, int] = field(default_factory=dict)

    def run(self, *cmd: str, check: bool = True, env: dict[str, str] | None = None,
            cwd: Path | str | None = None, timeout_s: float = 60) -> subprocess.CompletedProcess:
        """Run a Slurm command against this cluster; raises with log tails on failure."""
        done = subprocess.run(cmd, env={**self.env, **(env or {})}, cwd=cwd,
                              capture_output=True, text=True, timeout=timeout_s)
        if check and done.returncode != 0:
            raise SlurmClusterError(f"`{' '.join(cmd)}` failed ({done.returncode}):\n"
                                    f"{done.stdout}{done.stderr}\n{self.log_tails()}")
        return done

    def sbatch(self, script_path: Path | str, *args: str, options: Sequence[str] = (),
               env: dict[str, str] | None = None, cwd: Path | str | None = None) -> str:
        """Submit `script_path args...` with sbatch `options` (e.g. ["--time=1"]); the job id."""
        done = self.run("sbatch", "--parsable", *options, str(script_path), *args, env=env, cwd=cwd)
        return done.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as key/value pairs; empty once the record is purged (MinJobAge)."""
        done = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        if done.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", done.stdout))

    def job_state(self, job_id: str) -> str:
        info = self.job_info(job_id)
        if not info:
            raise SlurmClusterError(f"job {job_id} is unknown to slurmctld\n{self.log_tails()}")
        return info["JobState"]

    def restart_count(self, job_id: str) -> int:
        return int(self.job_info(job_id).get("Restarts", 0))

    def release_now(self, job_id: str) -> bool:
        """Start a requeued job now instead of after cred_expire; True if it was released."""
        info = self.job_info(job_id)
        restarts = int(info.get("Restarts", 0))
        if info.get("JobState") != "PENDING" or restarts == 0:
            return False
        if self._released.get(job_id) == restarts:
            return False
        # Refused (harmlessly) when the scheduler started the job since we looked.
        done = self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
        self._released[job_id] = restarts
        return done.returncode == 0

    def wait(self, job_id: str, states: frozenset[str] | set[str] = FINISHED_STATES,
             timeout_s: float = 180, release_requeued: bool = True) -> str:
        """Poll until the job is in one of `states`; requeued jobs are released at once."""
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            if release_requeued:
                self.release_now(job_id)
            time.sleep(0.5)
        raise SlurmClusterError(
            f"job {job_id} still {state} after {timeout_s:.0f} s, wanted one of {sorted(states)}:"
            f"\n{self.job_info(job_id)}\n{self.log_tails()}")

    def log_tails(self, lines: int = 30) -> str:
        """Last lines of each daemon's log (its captured stdout where it wrote no log file)."""
        logs = self.root / "log"
        chosen = []
        for name in ["munged", "slurmctld", *(f"slurmd-{node}" for node in self.nodes)]:
            log_file = logs / f"{name}.log"
            chosen.append(log_file if log_file.exists() and log_file.stat().st_size
                          else logs / f"{name}.stdout")
        return "\n".join(_tail(path, lines) for path in chosen)

    def wait_until_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        shown = ""
        while time.monotonic() < deadline:
            done = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            shown = (done.stdout + done.stderr).strip()
            if done.returncode == 0 and sorted(shown.splitlines()) == sorted(
                    f"{node} idle" for node in self.nodes):
                return
            time.sleep(0.5)
        raise SlurmClusterError(f"nodes {', '.join(self.nodes)} not all idle after {timeout_s:.0f} s "
                                f"(sinfo: {shown!r})\n{self.log_tails()}")


def cluster_processes(conf_path: Path) -> list[int]:
    """Pids (not ours) started with this cluster's SLURM_CONF: its daemons, job steps, scripts."""
    marker = f"SLURM_CONF={conf_path}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


def _stop(process: subprocess.Popen, timeout_s: float = 15) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def slurm_cluster(tmp_dir: Path | str, cpus: int = 2, memory_mb: int = 4096, gpus: int = 0,
                  nodes: int = 1, start_timeout_s: float = 60) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and one slurmd per node (`node_names(nodes)`); stop all of it on exit.

    Every node declares `cpus`, `memory_mb` and `gpus`; `gpus` > 0 declares that many device-less
    GPU GRES so scripts with `--gpus-per-node` are accepted on a machine without GPUs (jobs still
    see no GPU and run on CPU). All nodes share this machine's cores.
    """
    if nodes < 1:
        raise ValueError(f"nodes={nodes}: a cluster needs at least one node")
    reason = ensure_slurm_installed()
    if reason:
        raise SlurmClusterError(reason)
    root = Path(tmp_dir).resolve()
    sockets = _socket_dir(root)
    for sub in ("state", "log", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    names = node_names(nodes)
    for name in names:
        (sockets / "spool" / name).mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)  # munged refuses keys and sockets under group/world-writable folders
    conf_path = root / "slurm.conf"
    controller_port, *node_ports = _free_ports(1 + nodes)
    conf_path.write_text(_slurm_conf(root, sockets, names, cpus, memory_mb, gpus, controller_port, node_ports))
    if gpus:
        _fake_gpu_gres(root, names, gpus)
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    env = {**os.environ, "SLURM_CONF": str(conf_path), "PATH": path}
    for inherited in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
        if inherited != "SLURM_CONF":  # a test run inside a real Slurm job must not leak into ours
            del env[inherited]
    cluster = SlurmCluster(root=root, conf_path=conf_path, env=env, nodes=names)

    key = root / "munge" / "munge.key"
    if not key.exists():
        subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True)
    key.chmod(0o600)
    daemons: list[subprocess.Popen] = []

    def start(log_name: str, *cmd: str) -> None:
        with (root / "log" / f"{log_name}.stdout").open("ab") as log:
            daemons.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True))

    try:
        start("munged", _which("munged"), "--foreground", "--force", f"--socket={sockets / 'munge.socket'}",
              f"--key-file={key}", f"--pid-file={root / 'munge' / 'munged.pid'}",
              f"--seed-file={root / 'munge' / 'munged.seed'}")
        deadline = time.monotonic() + start_timeout_s  # a hang guard: the wait is on the socket file
        while not (sockets / "munge.socket").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        start("slurmctld", _which("slurmctld"), "-D", "-c", "-f", str(conf_path))
        for name in names:
            start(f"slurmd-{name}", _which("slurmd"), "-D", "-N", name, "-f", str(conf_path))
        cluster.wait_until_idle(start_timeout_s)
        yield cluster
    finally:
        _shutdown(cluster, daemons)
        if sockets != root:
            shutil.rmtree(sockets, ignore_errors=True)


def _shutdown(cluster: SlurmCluster, daemons: list[subprocess.Popen]) -> None:
    """Cancel jobs while the daemons run, stop the daemons, then kill leftover job processes."""
    if len(daemons) == 2 + len(cluster.nodes) and all(d.poll() is None for d in daemons):
        cluster.run("scancel", "--user=root", check=False, timeout_s=20)
        deadline = time.monotonic() + 120  # a hang guard: the wait is on an empty queue
        while time.monotonic() < deadline:
            queue = cluster.run("squeue", "-h", "-o", "%i", check=False, timeout_s=20)
            if queue.returncode != 0 or not queue.stdout.strip():
                break
            time.sleep(0.5)
    for daemon in reversed(daemons):  # the slurmds, slurmctld, munged
        _stop(daemon)
    for pid in cluster_processes(cluster.conf_path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
