"""DeepSpeed's CPU allreduce buffers do not outlive a run in /dev/shm (they used to: 66 MB per rank
per run, until the machine ran out of memory)."""
from __future__ import annotations

import os

from pipeline.train.engine import unlink_shm_buffers


def test_a_rank_unlinks_only_its_own_buffer_names_of_this_job(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29501")
    uid = os.getuid()
    names = [f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_29501_0",   # this rank, this job
             f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_29501_1",   # the peer's
             f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_29502_0",   # another job on the machine
             "unrelated_segment"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = unlink_shm_buffers(0, shm_dir=tmp_path)
    assert [p.name for p in removed] == [names[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])
