"""The one translation from a launcher's environment to the torch.distributed environment of a rank.

Every training process calls `apply_rank_environment()` once, at the stage entry
(pipeline/train/cli.py); `pipeline.train.engine.init_distributed` then only reads the five
variables in `RANK_VARIABLES`. The sources, first match wins:

1. A launcher that set RANK (torchrun, DeepSpeed's launcher from `bash launch/stageN.sh` or
   `deepspeed launch/stageN.sh`): its values, checked for completeness.
2. Open MPI (OMPI_COMM_WORLD_RANK: `mpirun`, `deepspeed --launcher openmpi`): the ranks from
   OMPI_COMM_WORLD_*; the master is 127.0.0.1 when all ranks share one node, else rank 0's address
   through mpi4py, port 29500 (what deepspeed.init_distributed's MPI discovery did). It comes before
   Slurm because processes that mpirun starts inside an allocation also carry the SLURM_* variables
   of mpirun's daemon step.
3. srun tasks (SLURM_PROCID inside a job step, i.e. with SLURM_STEP_ID: `sbatch launch/stageN.sh`,
   `deepspeed --launcher slurm`): SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS; the master is the
   first host of SLURM_STEP_NODELIST (else SLURM_JOB_NODELIST), where srun puts task 0, and the port
   20000 + SLURM_JOB_ID % 20000.
4. Anything else, a batch script's own process included (Slurm sets SLURM_PROCID=0 and the job's
   SLURM_NTASKS there too, but nothing starts peers): a world of one on 127.0.0.1 and a free port.

MASTER_ADDR / MASTER_PORT already in the environment win over derived ones in 2 and 3 (the launch
scripts document them as overrides); a world of one keeps a given MASTER_PORT but always binds
127.0.0.1. An inconsistent environment raises `LaunchEnvError` naming the variable. Standard library
only: the entry calls this before the heavy imports.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, MutableMapping

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
MPI_DEFAULT_PORT = 29500  # deepspeed.comm's TORCH_DISTRIBUTED_DEFAULT_PORT, which its MPI discovery used


class LaunchEnvError(ValueError):
    """The environment names a launcher but lacks (or contradicts) a variable it should set."""


def scontrol_hostnames(nodelist: str) -> list[str]:
    """`scontrol show hostnames <nodelist>`: a Slurm host list (`node[01-04]`) as host names."""
    done = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                          capture_output=True, text=True, check=True)
    return done.stdout.split()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mpi_rank0_address() -> str:
    """Rank 0's address, broadcast over MPI (a collective: every rank calls it), as DeepSpeed did."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise LaunchEnvError(
            "Open MPI ranks on several nodes: MASTER_ADDR is not set and mpi4py (to ask rank 0) is not "
            "installed; pass rank 0's host with `mpirun -x MASTER_ADDR=<host>`") from None
    comm = MPI.COMM_WORLD
    address = None
    if comm.Get_rank() == 0:
        try:
            address = subprocess.check_output(["hostname", "-I"], text=True).split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            address = socket.gethostbyname(socket.gethostname())
    return comm.bcast(address, root=0)


def rank_environment(environ: Mapping[str, str],
                     hostnames: Callable[[str], list[str]] = scontrol_hostnames,
                     port: Callable[[], int] = free_port,
                     mpi_master: Callable[[], str] = mpi_rank0_address) -> dict[str, str]:
    """RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT of this process, from `environ`
    (see the module docstring). The callables are asked only where the environment lacks the
    answer: `hostnames` expands a Slurm node list, `port` picks a free port for a world of one,
    `mpi_master` finds Open MPI rank 0's address."""
    if "RANK" in environ:
        source = f"RANK={environ['RANK']} (set by a launcher)"
        rank, local_rank, world = (_int(environ, name, source) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        _check_ranks(rank, local_rank, world, ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        return _env(rank, local_rank, world, _get(environ, "MASTER_ADDR", source),
                    _int(environ, "MASTER_PORT", source))

    if "OMPI_COMM_WORLD_RANK" in environ:
        names = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE")
        source = f"OMPI_COMM_WORLD_RANK={environ['OMPI_COMM_WORLD_RANK']} (an Open MPI rank)"
        rank, local_rank, world = (_int(environ, name, source) for name in names)
        _check_ranks(rank, local_rank, world, names)
        master = environ.get("MASTER_ADDR")
        if not master:
            local_size = environ.get("OMPI_COMM_WORLD_LOCAL_SIZE")
            master = "127.0.0.1" if local_size == str(world) else mpi_master()
        return _env(rank, local_rank, world, master, _port(environ, MPI_DEFAULT_PORT))

    if "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:
        names = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS")
        source = f"SLURM_PROCID={environ['SLURM_PROCID']} in job step {environ['SLURM_STEP_ID']} (an srun task)"
        rank, local_rank, world = (_int(environ, name, source) for name in names)
        _check_ranks(rank, local_rank, world, names)
        master = environ.get("MASTER_ADDR") or _first_host(environ, hostnames, source)
        if environ.get("MASTER_PORT"):
            master_port = _int(environ, "MASTER_PORT", source)
        else:
            master_port = 20000 + _int(environ, "SLURM_JOB_ID", source) % 20000
        return _env(rank, local_rank, world, master, master_port)

    return _env(0, 0, 1, "127.0.0.1", _port(environ, None) or port())


def ranks_on_this_node(environ: Mapping[str, str] = os.environ) -> int:
    """How many ranks share this node, as the launcher says (1 when none does)."""
    for name in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = environ.get(name, "")
        digits = value[:len(value) - len(value.lstrip("0123456789"))]  # Slurm may say "4(x2)"
        if digits:
            return int(digits)
    return 1


def apply_rank_environment(environ: MutableMapping[str, str] = os.environ, **sources) -> dict[str, str]:
    """Write `rank_environment(environ)` into `environ` (the process's own by default) and return
    it; rank 0 prints one line to stderr (stdout stays the command's own: --print-config's YAML).
    Idempotent: once RANK is set, a second call keeps every value."""
    values = rank_environment(environ, **sources)
    environ.update(values)
    if values["RANK"] == "0":
        print(f"[launch] rank 0 of {values['WORLD_SIZE']}, master "
              f"{values['MASTER_ADDR']}:{values['MASTER_PORT']}", file=sys.stderr, flush=True)
    return values


def _env(rank: int, local_rank: int, world: int, master_addr: str, master_port: int) -> dict[str, str]:
    return {"RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world),
            "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}


def _get(environ: Mapping[str, str], name: str, source: str) -> str:
    value = environ.get(name)
    if not value:
        raise LaunchEnvError(f"{source}, but {name} is not set")
    return value


def _int(environ: Mapping[str, str], name: str, source: str) -> int:
    value = _get(environ, name, source)
    try:
        return int(value)
    except ValueError:
        raise LaunchEnvError(f"{source}, but {name}={value!r} is not an integer") from None


def _port(environ: Mapping[str, str], default: int | None) -> int | None:
    if not environ.get("MASTER_PORT"):
        return default
    return _int(environ, "MASTER_PORT", "MASTER_PORT is given")


def _check_ranks(rank: int, local_rank: int, world: int, names: tuple[str, str, str]) -> None:
    rank_name, local_name, world_name = names
    if world < 1:
        raise LaunchEnvError(f"{world_name}={world}: a world needs at least one rank")
    if not 0 <= rank < world:
        raise LaunchEnvError(f"{rank_name}={rank} is outside 0..{world - 1} ({world_name}={world})")
    if not 0 <= local_rank < world:
        raise LaunchEnvError(f"{local_name}={local_rank} is outside 0..{world - 1} ({world_name}={world})")


def _first_host(environ: Mapping[str, str], hostnames: Callable[[str], list[str]], source: str) -> str:
    name = next((n for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST") if environ.get(n)), None)
    if name is None:
        raise LaunchEnvError(f"{source}, but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set "
                             "(or set MASTER_ADDR)")
    try:
        hosts = hostnames(environ[name])
    except (OSError, subprocess.CalledProcessError) as error:
        raise LaunchEnvError(f"{source}: cannot expand {name}={environ[name]!r} with `scontrol show "
                             f"hostnames` ({error}); set MASTER_ADDR") from None
    if not hosts:
        raise LaunchEnvError(f"{source}: {name}={environ[name]!r} names no host; set MASTER_ADDR")
    return hosts[0]
