"""Distillation sharded over processes: same bytes for 1 and N workers, failures name the rank, nothing partial.

Each multi-process test starts two real local processes (gloo), kept cheap with the 8x8 digits,
two images per class and a few iterations.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from replaykit.cli import main
from replaykit.data import dataset_info, load_tensors
from replaykit.distributed import ClassJob, DistributedDistillError, assign_ranks, distill_per_class, merge_parts



def _cli(ipc: int = 2) -> list[str]:
    return ["distill", "--dataset", "digits", "--method", "dm", "--ipc", str(ipc), "--iterations", "4", "--classes", "0,1,2", "--quiet"]


CLI_ARGS = _cli()


@pytest.fixture(scope="module")
def digits():
    return load_tensors("digits", train=True)


def _jobs(digits, classes=(0, 1, 2), ipc=2, seed=0, per_class=None) -> list[ClassJob]:
    x, y = digits
    meta = dataset_info("digits").meta()
    return [ClassJob("dm", {"iterations": 3}, ipc, seed, x[y == c][:per_class], y[y == c][:per_class], 10, meta) for c in classes]


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    return {key: t.numpy().tobytes() for key, t in load_file(str(path)).items()}


@pytest.fixture(scope="module")
def one_worker_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "w1.safetensors"
    assert main([*CLI_ARGS, "--workers", "1", "--out", str(out)]) == 0
    return out


def test_round_robin_assignment_is_the_same_everywhere():
    assert assign_ranks(5, 2) == [0, 1, 0, 1, 0]
    assert assign_ranks(2, 4) == [0, 1]


def test_jobs_follow_their_own_seeds(digits):
    first, again, other = (distill_per_class(_jobs(digits, classes=(3,), seed=s)) for s in (0, 0, 1))
    assert torch.equal(first[0].images, again[0].images)
    assert not torch.equal(first[0].images, other[0].images)  # so equal bytes below mean something
    merged = merge_parts(distill_per_class(_jobs(digits, classes=(3, 5))), workers=1)
    assert merged.counts() == {3: 2, 5: 2} and merged.meta["workers"] == 1


def test_bad_calls_are_refused_before_any_process_starts(digits):
    jobs = _jobs(digits, classes=(0,))
    with pytest.raises(ValueError, match="workers must be a positive int"):
        distill_per_class(jobs, workers=0)
    with pytest.raises(ValueError, match="no jobs"):
        distill_per_class([])
    with pytest.raises(ValueError, match="job 0 .*unknown distillation method"):
        distill_per_class([ClassJob("nope", {}, 2, 0, jobs[0].images, jobs[0].labels, 10)])
    with pytest.raises(ValueError, match="must not set"):
        distill_per_class([ClassJob("dm", {"seed": 3}, 2, 0, jobs[0].images, jobs[0].labels, 10)])
    unshippable = ClassJob("dm", {"iterations": 2}, 2, 0, jobs[0].images, jobs[0].labels, 10, {"mean": torch.zeros(1)})
    with pytest.raises(ValueError, match="must be JSON"):
        distill_per_class([unshippable, unshippable], workers=2)


def test_two_workers_write_the_bytes_of_one(tmp_path, one_worker_file):
    out = tmp_path / "w2.safetensors"
    assert main([*CLI_ARGS, "--workers", "2", "--out", str(out)]) == 0
    assert _tensor_bytes(out) == _tensor_bytes(one_worker_file)
    assert load_file(str(out))["class_ids"].tolist() == [0, 0, 1, 1, 2, 2]


def test_torchrun_launch_writes_the_bytes_of_one(tmp_path, one_worker_file):
    out = tmp_path / "tr.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "replaykit", *CLI_ARGS, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _tensor_bytes(out) == _tensor_bytes(one_worker_file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tr.safetensors"]  # rank 1 wrote nothing


def test_worker_that_raises_is_named(digits):
    jobs = _jobs(digits, ipc=3, per_class=3)
    jobs[1] = _jobs(digits, classes=(1,), ipc=3, per_class=2)[0]  # job 1 runs on rank 1 and cannot work
    with pytest.raises(DistributedDistillError, match=r"rank 1 failed on job 1 .*fewer real images") as caught:
        distill_per_class(jobs, workers=2)
    assert caught.value.rank == 1


PEER = textwrap.dedent(
    """
    import hashlib, os, sys, time
    from replaykit.cli import main
    from replaykit.data import load_tensors
    from replaykit.distributed import ClassJob, distill_per_class, init_from_env

    mode, rank = sys.argv[1], os.environ["RANK"]
    if mode == "all-ranks":  # the library call, every rank asking for the full result
        x, y = load_tensors("digits")
        jobs = [ClassJob("dm", {"iterations": 3}, 2, 0, x[y == c], y[y == c], 10) for c in (0, 1, 2)]
        parts = distill_per_class(jobs, group=init_from_env(), all_ranks=True)
        print([hashlib.sha256(p.images.numpy().tobytes()).hexdigest() for p in parts], flush=True)
    elif rank == "0":  # the CLI as torchrun would run it, waiting at most 3 s for rank 1
        sys.exit(main(sys.argv[2:] + ["--worker-timeout", "3"]))
    else:
        init_from_env()
        if mode == "exit":
            os._exit(3)
        time.sleep(600)
    """
)


def _run_pair(tmp_path: Path, mode: str, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    """Rank 0 and rank 1 of a 2-process gloo group on this machine, started as torchrun would; rank 1 is killed after."""
    script = tmp_path / "peer.py"
    script.write_text(PEER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), mode, *args]
    peer = subprocess.Popen(cmd, env={**env, "RANK": "1", "LOCAL_RANK": "1"}, stdout=subprocess.PIPE, text=True)
    try:
        lead = subprocess.run(cmd, env={**env, "RANK": "0", "LOCAL_RANK": "0"}, capture_output=True, text=True, timeout=120)
        if mode == "all-ranks":
            return lead, peer.communicate(timeout=60)[0]
    finally:
        peer.kill()
        peer.communicate()
    return lead, ""


@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_dead_or_hung_rank_is_named_and_nothing_is_written(tmp_path, mode):
    out = tmp_path / "never.safetensors"
    lead, _ = _run_pair(tmp_path, mode, *CLI_ARGS, "--out", str(out))
    assert lead.returncode == 2, lead.stderr[-2000:]
    assert "error: rank 1 did not send data to rank 0 within 3 s" in lead.stderr, lead.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peer.py"]


def test_all_ranks_get_the_same_full_result(tmp_path, digits):
    lead, peer_out = _run_pair(tmp_path, "all-ranks")
    assert lead.returncode == 0, lead.stderr[-2000:]
    x, y = digits
    here = distill_per_class([ClassJob("dm", {"iterations": 3}, 2, 0, x[y == c], y[y == c], 10) for c in (0, 1, 2)])
    expected = str([hashlib.sha256(p.images.numpy().tobytes()).hexdigest() for p in here])
    assert lead.stdout.strip() == peer_out.strip() == expected
