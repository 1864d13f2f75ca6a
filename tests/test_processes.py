"""Calibration and evaluation shared over processes (torchrun, gloo) give what one process gives, bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st
from processes_worker import main

from polykv.errors import PolykvError
from polykv.harness.processes import ONE, Processes, joined

WORKER = Path(__file__).with_name("processes_worker.py")


@pytest.mark.processes
@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo")
def test_two_processes_calibrate_and_evaluate_exactly_as_one(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER)]
    # the fault handler: a process that aborts shows where each of its threads was
    shared = subprocess.Popen(
        [*command, str(two)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each process under torchrun: the same reductions, in the same order
    try:
        main(one)
    finally:
        torch.set_num_threads(threads)
    output, _ = shared.communicate(timeout=300)
    assert shared.returncode == 0, output

    profiles = [json.loads((folder / name).read_text()) for folder, name in
                ((one, "profile-0.json"), (two, "profile-0.json"), (two, "profile-1.json"))]  # fmt: skip
    assert profiles[1]["costs"] == profiles[2]["costs"]  # timed on the first process, sent to the other
    for profile in profiles:
        del profile["costs"]  # timings: no two runs agree
    assert profiles[0]["regimes"] and profiles[0]["losses"]
    assert profiles[1] == profiles[0] and profiles[2] == profiles[0]  # every float equal, tuning included
    records = [(folder / name).read_text() for folder, name in
               ((one, "records-0.json"), (two, "records-0.json"), (two, "records-1.json"))]  # fmt: skip
    assert records[1] == records[0] and records[2] == records[0]
    written = (one / "eval" / "results.jsonl").read_text()
    assert len(written.splitlines()) == 18 and (two / "eval" / "results.jsonl").read_text() == written


@given(st.integers(0, 40), st.integers(1, 6))
def test_the_processes_share_every_item_once_and_rounds_go_in_order(count, size):
    everyone = [Processes(rank, size) for rank in range(size)]
    assert sorted(i for processes in everyone for i in processes.share(count)) == list(range(count))
    rounds = [list(processes.rounds(count)) for processes in everyone]
    in_order = [index for taken in zip(*rounds) for index in taken if index is not None]
    assert in_order == list(range(count))


def test_one_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with joined("cpu") as (processes, device):
        assert processes == ONE and device == "cpu"
        assert processes.gather("x") == ["x"] and processes.from_main(lambda: 3) == 3


@pytest.mark.parametrize(
    ("device", "message"), [("cuda:1", "each process takes its own GPU"), ("meta", "cuda \\(NCCL\\) or cpu")]
)
def test_under_torchrun_a_device_that_cannot_be_shared_is_refused(monkeypatch, device, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PolykvError, match=message), joined(device):
        pass
