"""pipeline.train.launch_env: the one translation from a launcher's environment (srun, Open MPI,
torchrun / DeepSpeed's launcher, none) to RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.train.launch_env import (RANK_VARIABLES, LaunchEnvError, apply_rank_environment,
                                       mpi_rank0_address, rank_environment, scontrol_hostnames)

# What srun gives task 1 of 4 in job step 0 of job 123456 on two nodes (2 tasks per node).
SRUN_TASK = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_LOCALID": "1",
             "SLURM_NTASKS": "4", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[01-08]"}
# What mpirun gives rank 3 of 4 on two nodes.
OMPI_RANK = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4",
             "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}


def expanded(calls: list[str]):
    def hostnames(nodelist: str) -> list[str]:
        calls.append(nodelist)
        prefix, numbers = nodelist.rstrip("]").split("[")
        first, last = numbers.split("-")
        return [f"{prefix}{i:02d}" for i in range(int(first), int(last) + 1)]
    return hostnames


def never(*_):
    raise AssertionError("asked although the environment has the answer")


def test_a_launcher_that_set_rank_keeps_all_its_values_even_inside_an_srun_task():
    torchrun = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "node3", "MASTER_PORT": "29600"}
    got = rank_environment({**SRUN_TASK, **OMPI_RANK, **torchrun}, hostnames=never, port=never, mpi_master=never)
    assert got == torchrun


def test_the_result_is_exactly_the_five_variables_as_strings():
    got = rank_environment({}, port=lambda: 40000)
    assert list(got) == list(RANK_VARIABLES) and all(isinstance(v, str) for v in got.values())


@pytest.mark.parametrize("missing", ["LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"])
def test_a_launcher_rank_without_one_of_the_other_variables_is_an_error_naming_it(missing):
    environ = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    del environ[missing]
    with pytest.raises(LaunchEnvError, match=rf"RANK=0 \(set by a launcher\), but {missing} is not set"):
        rank_environment(environ)


def test_a_launcher_rank_outside_the_world_is_an_error_naming_rank_and_world_size():
    environ = {"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    with pytest.raises(LaunchEnvError, match=r"RANK=2 is outside 0\.\.1 \(WORLD_SIZE=2\)"):
        rank_environment(environ)


def test_a_non_integer_rank_variable_is_an_error_naming_it():
    environ = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "two", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    with pytest.raises(LaunchEnvError, match="WORLD_SIZE='two' is not an integer"):
        rank_environment(environ)


def test_an_srun_task_is_the_rank_of_its_task_ids_with_the_first_step_host_as_master():
    calls: list[str] = []
    got = rank_environment(SRUN_TASK, hostnames=expanded(calls), port=never, mpi_master=never)
    assert got == {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "gpu07",
                   "MASTER_PORT": str(20000 + 123456 % 20000)}
    assert calls == ["gpu[07-08]"]  # the step's node list, not the job's


def test_an_srun_task_without_a_step_node_list_takes_the_first_host_of_the_job():
    environ = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_NODELIST"}
    assert rank_environment(environ, hostnames=expanded([]))["MASTER_ADDR"] == "gpu01"


def test_the_srun_master_port_is_20000_plus_the_job_id_modulo_20000():
    got = rank_environment({**SRUN_TASK, "SLURM_JOB_ID": "40007"}, hostnames=expanded([]))
    assert got["MASTER_PORT"] == "20007"


def test_an_srun_task_keeps_a_given_master_addr_and_port_without_asking_scontrol():
    got = rank_environment({**SRUN_TASK, "MASTER_ADDR": "login1", "MASTER_PORT": "31000"}, hostnames=never)
    assert (got["MASTER_ADDR"], got["MASTER_PORT"]) == ("login1", "31000")


@pytest.mark.parametrize("missing", ["SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID"])
def test_an_srun_task_without_a_slurm_variable_it_needs_is_an_error_naming_it(missing):
    environ = {k: v for k, v in SRUN_TASK.items() if k != missing}
    message = rf"SLURM_PROCID=1 in job step 0 \(an srun task\), but {missing} is not set"
    with pytest.raises(LaunchEnvError, match=message):
        rank_environment(environ, hostnames=expanded([]))


def test_an_srun_task_without_any_node_list_is_an_error_naming_both_node_list_variables():
    environ = {k: v for k, v in SRUN_TASK.items() if not k.endswith("NODELIST")}
    with pytest.raises(LaunchEnvError, match="neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set"):
        rank_environment(environ)


def test_a_failing_scontrol_is_an_error_naming_the_node_list_variable_and_master_addr():
    def broken(nodelist):
        raise subprocess.CalledProcessError(1, ["scontrol"])
    with pytest.raises(LaunchEnvError, match=r"cannot expand SLURM_STEP_NODELIST='gpu\[07-08\]'.*set MASTER_ADDR"):
        rank_environment(SRUN_TASK, hostnames=broken)


def test_an_srun_task_id_outside_the_task_count_is_an_error_naming_both():
    with pytest.raises(LaunchEnvError, match=r"SLURM_PROCID=4 is outside 0\.\.3 \(SLURM_NTASKS=4\)"):
        rank_environment({**SRUN_TASK, "SLURM_PROCID": "4"}, hostnames=expanded([]))


def test_the_batch_script_process_itself_is_a_world_of_one_despite_slurm_procid_and_ntasks():
    # Slurm sets SLURM_PROCID=0 and the job's SLURM_NTASKS in the batch step too, but no SLURM_STEP_ID.
    batch = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"}
    batch.update(SLURM_PROCID="0", SLURM_LOCALID="0")
    got = rank_environment(batch, hostnames=never, port=lambda: 45678)
    assert got == {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": "45678"}


def test_a_plain_process_is_a_world_of_one_on_loopback_with_a_free_port():
    got = rank_environment({}, hostnames=never, port=lambda: 45678, mpi_master=never)
    assert got == {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": "45678"}


def test_a_plain_process_keeps_a_given_master_port_but_always_binds_loopback():
    got = rank_environment({"MASTER_ADDR": "node9", "MASTER_PORT": "29511"}, port=never)
    assert (got["MASTER_ADDR"], got["MASTER_PORT"]) == ("127.0.0.1", "29511")


def test_the_default_free_port_is_a_bindable_port():
    port = int(rank_environment({})["MASTER_PORT"])
    assert 0 < port < 65536


def test_open_mpi_ranks_on_one_node_come_from_ompi_comm_world_with_loopback_and_deepspeeds_port():
    one_node = {**OMPI_RANK, "OMPI_COMM_WORLD_LOCAL_RANK": "3", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    got = rank_environment(one_node, hostnames=never, port=never, mpi_master=never)
    assert got == {"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": "29500"}


def test_open_mpi_ranks_on_several_nodes_ask_mpi_for_rank_0s_address():
    got = rank_environment(OMPI_RANK, hostnames=never, port=never, mpi_master=lambda: "10.0.0.7")
    assert got == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.7",
                   "MASTER_PORT": "29500"}


def test_open_mpi_ranks_keep_a_given_master_addr_and_port():
    got = rank_environment({**OMPI_RANK, "MASTER_ADDR": "node1", "MASTER_PORT": "31000"}, mpi_master=never)
    assert (got["MASTER_ADDR"], got["MASTER_PORT"]) == ("node1", "31000")


def test_open_mpi_wins_over_the_slurm_variables_of_mpiruns_daemon_step():
    got = rank_environment({**SRUN_TASK, **OMPI_RANK}, hostnames=never, mpi_master=lambda: "10.0.0.7")
    assert (got["RANK"], got["WORLD_SIZE"], got["MASTER_PORT"]) == ("3", "4", "29500")


@pytest.mark.parametrize("missing", ["OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"])
def test_open_mpi_without_a_comm_world_variable_is_an_error_naming_it(missing):
    environ = {k: v for k, v in OMPI_RANK.items() if k != missing}
    with pytest.raises(LaunchEnvError, match=rf"\(an Open MPI rank\), but {missing} is not set"):
        rank_environment(environ, mpi_master=never)


def test_open_mpi_on_several_nodes_without_mpi4py_is_an_error_naming_master_addr(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # `import mpi4py` raises ImportError
    with pytest.raises(LaunchEnvError, match="MASTER_ADDR is not set and mpi4py"):
        mpi_rank0_address()


def test_scontrol_hostnames_expands_a_node_list_with_scontrol_show_hostnames(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu07\\ngpu08\\n" || exit 3\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert scontrol_hostnames("gpu[07-08]") == ["gpu07", "gpu08"]


def test_apply_writes_the_variables_into_the_environment_and_a_second_call_keeps_them(capsys):
    environ = dict(SRUN_TASK, SLURM_PROCID="0", SLURM_LOCALID="0")
    first = apply_rank_environment(environ, hostnames=expanded([]))
    assert {k: environ[k] for k in RANK_VARIABLES} == first
    assert apply_rank_environment(environ, hostnames=never, port=never) == first
    assert "[launch] rank 0 of 4, master gpu07:23456" in capsys.readouterr().err
