"""Distillation sharded over processes: same bytes for 1 and N workers, failures name the rank, nothing partial.

Each multi-process test starts two real local processes (gloo), kept cheap with the 8x8 digits,
two images per class and a few iterations. The command line's jobs name the dataset and a class
(each rank loads its own classes) and its local workers are forked; the library's default spawns
fresh interpreters: both are run here.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from replaykit.cli import main
from replaykit.data import dataset_info, load_tensors
from replaykit.distributed import (
    ClassJob, DatasetClass, DistributedDistillError, assign_ranks, distill_per_class, merge_parts,
)



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
    with pytest.raises(ValueError, match="start_method must be one of"):
        distill_per_class(jobs, workers=2, start_method="forkserver")
    with pytest.raises(ValueError, match="unknown dataset"):
        ClassJob.from_dataset("dm", {}, 2, 0, "imagenet", 0)
    with pytest.raises(ValueError, match="job 0 .*class 10 is not a class of digits"):
        distill_per_class([ClassJob.from_dataset("dm", {}, 2, 0, "digits", 10)])
    both = ClassJob("dm", {}, 2, 0, jobs[0].images, jobs[0].labels, 10, source=DatasetClass("digits", 0))
    with pytest.raises(ValueError, match="either tensors or a source"):
        distill_per_class([both])


def _dataset_jobs(classes=(0, 1, 2), **kw) -> list[ClassJob]:
    return [ClassJob.from_dataset("dm", {"iterations": 3}, 2, 0, "digits", c, **kw) for c in classes]


def _same_parts(a, b) -> bool:
    return [(p.images.numpy().tobytes(), p.labels.numpy().tobytes(), p.class_ids.tolist()) for p in a] == \
           [(p.images.numpy().tobytes(), p.labels.numpy().tobytes(), p.class_ids.tolist()) for p in b]


def test_a_dataset_job_loads_its_class_with_the_bytes_of_the_sliced_tensors(digits):
    here = distill_per_class(_jobs(digits))
    assert _same_parts(distill_per_class(_dataset_jobs()), here)
    assert _same_parts([job.run() for job in _dataset_jobs()], here)
    assert _dataset_jobs()[1].describe() == "method 'dm', classes [1], ipc 2, seed 0"


def test_spawned_workers_run_mixed_dataset_and_tensor_jobs_with_the_bytes_of_one(digits):
    jobs = _dataset_jobs()
    jobs[1] = _jobs(digits, classes=(1,))[0]  # rank 1's job carries tensors through the job file, rank 0's load digits
    assert _same_parts(distill_per_class(jobs, workers=2), distill_per_class(_jobs(digits)))


def test_forked_workers_give_the_bytes_of_one(digits):
    assert _same_parts(distill_per_class(_jobs(digits), workers=2, start_method="fork"), distill_per_class(_jobs(digits)))


def test_a_rank_that_cannot_load_its_class_is_named(tmp_path):
    jobs = [ClassJob.from_dataset("dm", {"iterations": 2}, 2, 0, "digits", 0),
            ClassJob.from_dataset("dm", {"iterations": 2}, 2, 0, "mnist", 1, root=tmp_path)]  # job 1, rank 1: no MNIST there
    with pytest.raises(DistributedDistillError, match=r"rank 1 could not load its classes .*classes \[1\].*MNIST is not under") as caught:
        distill_per_class(jobs, workers=2, start_method="fork")
    assert caught.value.rank == 1


def test_ranks_loading_mnist_write_the_bytes_of_one_process_on_its_tensors(tmp_path, real_data_root):
    out = tmp_path / "mnist.safetensors"
    cli = ["distill", "--dataset", "mnist", "--method", "dm", "--ipc", "1", "--iterations", "2", "--classes", "3,7", "--quiet"]
    assert main([*cli, "--workers", "2", "--out", str(out)]) == 0
    x, y = load_tensors("mnist")
    meta = dataset_info("mnist").meta()
    jobs = [ClassJob("dm", {"iterations": 2}, 1, 0, x[y == c], y[y == c], 10, meta) for c in (3, 7)]
    threads = torch.get_num_threads()
    here = merge_parts(distill_per_class(jobs, workers=1))  # one thread, as each worker
    assert torch.get_num_threads() == threads  # restored
    written = load_file(str(out))
    assert written["images"].numpy().tobytes() == here.images.numpy().tobytes()
    assert written["class_ids"].tolist() == [3, 7]


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


def _fault_on_rank_1(monkeypatch, tmp_path, sig) -> None:
    """Forked local workers whose rank 1 sends itself ``sig`` as its first job starts (the time goes to a file)."""

    def run(job):
        if os.environ.get("RANK") == "1":
            (tmp_path / "fault_at").write_text(repr(time.time()))
            os.kill(os.getpid(), sig)
            time.sleep(60)  # SIGKILL / SIGSTOP act at once; never reached
        return real_run(job)

    real_run = ClassJob.run
    monkeypatch.setattr(ClassJob, "run", run)


def _cli_error(err: str) -> str:
    lines = [line for line in err.splitlines() if "replaykit distill: error:" in line]
    assert lines, err[-2000:]
    return lines[-1]


def test_a_killed_local_worker_is_named_not_the_survivor_the_agent_stopped(tmp_path, monkeypatch, capsys):
    """Regression (fault runs, benchmarks/faults.py): a worker SIGKILLed mid-run was reported as "rank 0 failed on job 2:
    SignalException: got signal 15": forked workers inherited the agent's SIGTERM handler, so the agent's teardown
    of the survivor failed the survivor's job, and its verdict named it."""
    import signal

    _fault_on_rank_1(monkeypatch, tmp_path, signal.SIGKILL)
    out = tmp_path / "never.safetensors"
    args = ["distill", "--dataset", "digits", "--method", "dm", "--ipc", "2", "--iterations", "100000", "--classes",
            "0,1", "--quiet", "--workers", "2", "--worker-timeout", "10", "--out", str(out)]
    assert main(args) == 2  # rank 0 is deep in its job (minutes) when rank 1 dies
    ended = time.time()
    err = _cli_error(capsys.readouterr().err)
    assert "rank 1 " in err and "died" in err and "rank 0" not in err and "SignalException" not in err, err
    assert ended - float((tmp_path / "fault_at").read_text()) < 10 + 15  # generous: a loaded machine tears down slowly
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fault_at"]


def test_a_hung_local_worker_is_named_within_the_timeout(tmp_path, monkeypatch, capsys):
    """Regression (fault runs, benchmarks/faults.py): a SIGSTOPped worker was named 50.8 s after the fault with a 10 s timeout
    (rank 0 noticed only at the exchange, then the agent waited 30 s on the stopped worker's pending SIGTERM)."""
    import signal

    _fault_on_rank_1(monkeypatch, tmp_path, signal.SIGSTOP)
    out = tmp_path / "never.safetensors"
    args = ["distill", "--dataset", "digits", "--method", "dm", "--ipc", "2", "--iterations", "100000", "--classes",
            "0,1", "--quiet", "--workers", "2", "--worker-timeout", "5", "--out", str(out)]
    assert main(args) == 2
    ended = time.time()
    err = _cli_error(capsys.readouterr().err)
    assert "error: rank 1 (pid " in err and "stopped: no heartbeat for 2.5 s" in err, err
    assert ended - float((tmp_path / "fault_at").read_text()) < 5 + 15  # the timeout + teardown on a loaded machine (was 50.8 s)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fault_at"]


def test_a_local_worker_that_hangs_before_joining_is_named_within_the_timeout(tmp_path, monkeypatch, capsys):
    """Found while fixing the above: a worker stopped before it joined the group was reported as "worker rank 0
    failed (exit code 1): DistStoreError", 36 s after the fault with a 6 s timeout."""
    import signal

    import torch.distributed as dist

    def init(*args, **kwargs):
        if os.environ.get("RANK") == "1":
            (tmp_path / "fault_at").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGSTOP)
        return real_init(*args, **kwargs)

    real_init = dist.init_process_group
    monkeypatch.setattr(dist, "init_process_group", init)
    args = ["distill", "--dataset", "digits", "--method", "dm", "--ipc", "2", "--iterations", "3", "--classes",
            "0,1", "--quiet", "--workers", "2", "--worker-timeout", "5", "--out", str(tmp_path / "never.safetensors")]
    assert main(args) == 2
    ended = time.time()
    err = _cli_error(capsys.readouterr().err)
    assert "error: rank 1 did not join the process group within 2.5 s" in err, err
    assert ended - float((tmp_path / "fault_at").read_text()) < 5 + 15  # the timeout + teardown on a loaded machine (was 36 s)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fault_at"]


def test_no_false_alarm_when_the_silence_limit_is_far_shorter_than_the_run(tmp_path):
    """Both workers compute for longer than the silence limit (2 s here): their beats keep going meanwhile."""
    out = tmp_path / "ok.safetensors"
    args = ["distill", "--dataset", "digits", "--method", "dm", "--ipc", "2", "--iterations", "1000", "--classes",
            "0,1", "--quiet", "--workers", "2", "--worker-timeout", "4", "--out", str(out)]
    started = time.time()
    assert main(args) == 0
    assert time.time() - started > 2 * 2.0  # long enough to mean something
    assert load_file(str(out))["class_ids"].tolist() == [0, 0, 1, 1]


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
    elif rank == "0":  # the CLI as torchrun would run it, naming a silent rank 1 after 3 s (half the timeout)
        sys.exit(main(sys.argv[2:] + ["--worker-timeout", "6"]))
    elif mode == "absent":  # rank 1 dies before it joins the group
        os._exit(3)
    elif mode == "stall":  # rank 1 runs the CLI too, and stops (as SIGSTOP does) when its first job starts
        import signal
        from pathlib import Path
        from replaykit import distributed

        def stop(job):
            Path(sys.argv[0]).with_name("stopped_at").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGSTOP)

        distributed.ClassJob.run = stop
        sys.exit(main(sys.argv[2:] + ["--worker-timeout", "6"]))
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
    assert "error: rank 1 sent no heartbeat within 3 s of rank 0 starting" in lead.stderr, lead.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peer.py"]


def test_a_rank_that_hangs_mid_run_is_named_while_rank_0_still_computes(tmp_path):
    """Regression (fault runs, benchmarks/faults.py): a hung rank was named only after rank 0's own jobs plus the timeout.
    Rank 0's heartbeat watcher now interrupts its job once rank 1's beat has been silent for half the timeout."""
    out = tmp_path / "never.safetensors"
    args = ["distill", "--dataset", "digits", "--method", "dm", "--ipc", "2", "--iterations", "100000", "--classes",
            "0,1", "--quiet", "--out", str(out)]  # rank 0's job alone would take minutes
    lead, _ = _run_pair(tmp_path, "stall", *args)
    ended = time.time()
    assert lead.returncode == 2, lead.stderr[-2000:]
    assert "error: rank 1 (pid " in lead.stderr and "stopped: no heartbeat for 3 s" in lead.stderr, lead.stderr[-2000:]
    assert ended - float((tmp_path / "stopped_at").read_text()) < 6 + 15  # the timeout + teardown on a loaded machine (was minutes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peer.py", "stopped_at"]


def test_a_rank_that_dies_before_joining_is_named_and_nothing_is_written(tmp_path):
    """Regression (fault runs, benchmarks/faults.py): rank 1 killed before it joined the group left rank 0 with a raw
    DistStoreError traceback ("1/2 clients joined") instead of an error naming the rank."""
    out = tmp_path / "never.safetensors"
    lead, _ = _run_pair(tmp_path, "absent", *CLI_ARGS, "--out", str(out))
    assert lead.returncode == 2, lead.stderr[-2000:]
    assert "error: rank 1 did not join the process group within 3 s" in lead.stderr, lead.stderr[-2000:]  # half of 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peer.py"]


def test_all_ranks_get_the_same_full_result(tmp_path, digits):
    lead, peer_out = _run_pair(tmp_path, "all-ranks")
    assert lead.returncode == 0, lead.stderr[-2000:]
    x, y = digits
    here = distill_per_class([ClassJob("dm", {"iterations": 3}, 2, 0, x[y == c], y[y == c], 10) for c in (0, 1, 2)])
    expected = str([hashlib.sha256(p.images.numpy().tobytes()).hexdigest() for p in here])
    assert lead.stdout.strip() == peer_out.strip() == expected


def test_merged_metadata_keeps_what_each_part_did():
    """A budget-stopped run's classes stop at different iterations: the merged buffer says so per part."""
    from replaykit.buffer import SyntheticBuffer

    def part(cls: int, done: int, stopped_by: str) -> SyntheticBuffer:
        ids = torch.tensor([cls])
        return SyntheticBuffer(torch.zeros(1, 1, 8, 8), ids, 10, ids,
                               meta={"iterations_done": done, "stopped_by": stopped_by, "distill_seconds": 1.5})

    merged = merge_parts([part(0, 900, "iterations"), part(1, 612, "time_budget")])
    assert merged.meta["part_iterations_done"] == [900, 612]
    assert merged.meta["iterations_done"] == 612
    assert merged.meta["part_stopped_by"] == ["iterations", "time_budget"]
    assert merged.meta["stopped_by"] == "time_budget"
    assert merged.meta["distill_seconds"] == 3.0


# ------------------------------------------------------------------ GPUs
def test_ranks_share_gpus_round_robin_and_nccl_needs_one_per_rank(monkeypatch):
    from replaykit.distributed import init_from_env, rank_gpu

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        assert [rank_gpu(r) for r in range(2 * n)] == list(range(n)) * 2
    else:
        assert rank_gpu(0) is None and rank_gpu(5) is None
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "LOCAL_RANK": "1",
           "LOCAL_WORLD_SIZE": "1000000"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="nccl needs one CUDA device per local rank"):
        init_from_env(backend="nccl")  # refused before any process group is made


def test_a_job_on_device_cpu_gives_the_bytes_of_the_default(digits):
    (job,) = _jobs(digits, classes=(3,))
    on_cpu = ClassJob(job.method, {**job.options, "device": "cpu"}, job.ipc, job.seed, job.images, job.labels, 10, job.meta)
    assert _same_parts(distill_per_class([job]), distill_per_class([on_cpu]))


@pytest.mark.cuda
def test_workers_on_cuda_distill_on_their_gpus_with_the_shapes_of_one(digits):
    jobs = [ClassJob(j.method, {**j.options, "device": "cuda"}, j.ipc, j.seed, j.images, j.labels, 10, j.meta) for j in _jobs(digits)]
    one, two = distill_per_class(jobs), distill_per_class(jobs, workers=2)
    assert [p.class_ids.tolist() for p in one] == [p.class_ids.tolist() for p in two]
    assert all((a.images - b.images).abs().mean() < 1e-2 for a, b in zip(one, two))  # float rounding, not bytes, on CUDA
