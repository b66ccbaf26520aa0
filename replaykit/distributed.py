"""Distill class by class over a ``torch.distributed`` process group.

Distilling one class never looks at the others (each distiller derives the
random streams of class ``c`` from its seed and ``c``), so a stream's classes
shard cleanly over workers. The unit of work is a :class:`ClassJob`: one
method, one seed, the real images of one class -- given as tensors, or as a
:class:`DatasetClass` (a named dataset's class, which whoever runs the job loads
and slices itself, so that no images travel to the workers; this is what the
command line uses). :func:`distill_per_class` runs a list of jobs

* in this process (the default; ``workers=1``: with one intra-op thread, as each of N workers),
* on ``workers=N`` local processes it starts itself with torch's elastic launch
  API (gloo, one intra-op thread each; fresh interpreters by default, or forked
  from the caller with ``start_method="fork"``, which skips a second torch import), or
* over a process group the caller already has (``group=``; e.g. the default
  group of a ``torchrun`` launch, see :func:`init_from_env`): every rank builds
  the same job list, runs the jobs assigned to it (job ``i`` goes to rank
  ``i % world_size``), and rank 0 gathers the parts (and, if asked, sends every
  rank the full result).

Parts travel as plain tensors (images, labels, class ids; metadata as JSON
bytes in a ``uint8`` tensor) through point-to-point collectives, never as
pickles. Every path runs the same ``make(method, ...).distill(...)`` call per
job, so the images and labels are bit-identical whatever the number of workers
-- for iteration-bounded runs, at the same intra-op thread count (every local worker,
and ``workers=1``, uses one: on MNIST-sized images two threads round some sums
differently). With a ``time_budget`` a method stops when the wall clock says so,
and the result then depends on how fast each worker ran. That promise is the CPU's: jobs with
``device="cuda"`` run on each rank's GPU (:func:`rank_gpu`), draw the same random numbers and agree
to float rounding, not to the byte (cuDNN's algorithms and atomic adds are not bit-reproducible).

Failures: a rank whose job raises reports the error to rank 0, and every rank
raises :class:`DistributedDistillError` naming it. Every rank beats a heartbeat
through the group's store and watches the others' (:class:`_Heartbeat`): a rank
that hangs or dies is named once its beat has been silent for half of ``timeout``
(at most a minute), so the run ends within ``timeout`` of the fault; a local worker
that dies is noticed at once by the elastic agent, and a hung one is killed by the
worker that noticed it. A rank that is alive but still working is waited for
``timeout`` seconds at the exchange. Nothing is returned or written unless every
part arrived.

Timing: with ``$REPLAYKIT_TRACE`` naming a folder, the command line and each local
worker note when their phases end (:func:`trace`) and write them there as JSON;
``benchmarks/distributed_speedup.py`` turns them into a breakdown of a run.
"""

from __future__ import annotations

import _thread
import datetime as _dt
import itertools
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

_IMPORTED_AT = time.time()  # a spawned worker's clock starts here, before torch loads (see trace)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from . import distill as _distill  # noqa: E402
from .buffer import SyntheticBuffer  # noqa: E402
from .fileio import atomic_write, atomic_write_bytes, atomic_write_json  # noqa: E402
from .typed import check_positive_int  # noqa: E402

__all__ = [
    "ClassJob", "DatasetClass", "DistributedDistillError", "distill_per_class", "assign_ranks", "init_from_env",
    "launched_by_torchrun", "merge_parts", "trace", "write_trace", "DEFAULT_TIMEOUT", "START_METHODS",
]

#: Seconds a rank waits for another at an exchange point. Ranks exchange only after all their
#: jobs are done, so this must exceed the spread of per-rank work, not the work itself. A rank
#: that stopped (hung or died) is named sooner, by its silent heartbeat (:func:`_silence_limit`).
DEFAULT_TIMEOUT = 1800.0
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_HEADER_LEN = 8  # status, n, C, H, W, soft-label columns (0: hard), num_classes, meta bytes
#: How local workers start: "spawn" runs fresh interpreters (``python -m replaykit.distributed``), safe
#: from any caller; "fork" copies the caller, torch already imported, which is safe only while the
#: caller has not run parallel torch work yet (a forked OpenMP pool can hang): the command line's case.
START_METHODS = ("spawn", "fork")
_TRACE_ENV = "REPLAYKIT_TRACE"
_trace_events: list[list] = []


def trace(event: str, when: float | None = None) -> None:
    """Note the wall-clock time of ``event`` when ``$REPLAYKIT_TRACE`` names a folder (benchmarks read it)."""
    if os.environ.get(_TRACE_ENV):
        _trace_events.append([event, time.time() if when is None else when])


def write_trace(role: str) -> None:
    """Write this process's noted events to ``$REPLAYKIT_TRACE/<role>.json`` (nothing when unset)."""
    folder = os.environ.get(_TRACE_ENV)
    if folder and _trace_events:
        atomic_write_json(Path(folder) / f"{role}.json", {"pid": os.getpid(), "events": list(_trace_events)})


class DistributedDistillError(RuntimeError):
    """A rank's job raised, or a rank died or hung; ``rank`` names it (``None`` if unknown)."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


@dataclass(frozen=True)
class DatasetClass:
    """The training images of class ``cls`` of a named dataset, as ``load_tensors(dataset, train, root)`` gives them.

    A job holding one of these instead of tensors is loaded where it runs: every process loads the
    split once and keeps ``images[labels == cls]``, the bytes a caller slicing the same tensors gets.
    ``root=None`` resolves the data root in that process (``$REPLAYKIT_DATA`` etc., see ``replaykit.data``).
    """

    dataset: str
    cls: int
    root: str | None = None
    train: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "cls": self.cls, "root": self.root, "train": self.train}

    @classmethod
    def from_json(cls, spec: dict[str, Any]) -> "DatasetClass":
        return cls(str(spec["dataset"]), int(spec["cls"]), spec.get("root"), bool(spec.get("train", True)))

    def check(self, num_classes: int) -> None:
        """Raise ``ValueError`` for an unknown dataset or a class outside it (or outside ``num_classes``)."""
        from .data import dataset_info

        info = dataset_info(self.dataset)  # ValueError naming the available datasets
        if isinstance(self.cls, bool) or not isinstance(self.cls, int) or not 0 <= self.cls < min(info.num_classes, num_classes):
            raise ValueError(f"class {self.cls!r} is not a class of {info.name} (0..{info.num_classes - 1}) "
                             f"within num_classes {num_classes}")
        if not isinstance(self.train, bool) or not (self.root is None or isinstance(self.root, str)):
            raise ValueError(f"train must be a bool and root a str or None, got {self.train!r}, {self.root!r}")


@dataclass
class ClassJob:
    """One distillation call: ``make(method, ipc=ipc, seed=seed, **options).distill(images, labels, ...)``.

    ``images`` / ``labels`` are normally the real data of one class; ``options`` are the
    method's constructor options (not ``ipc`` / ``seed`` / ``progress``). A job built with
    :meth:`from_dataset` has ``images = labels = None`` and a ``source`` instead: the process that
    runs it loads the class itself.
    """

    method: str
    options: dict[str, Any]
    ipc: int
    seed: int
    images: torch.Tensor | None
    labels: torch.Tensor | None
    num_classes: int
    meta: dict[str, Any] = field(default_factory=dict)
    source: DatasetClass | None = None

    @classmethod
    def from_dataset(cls, method: str, options: dict[str, Any], ipc: int, seed: int, dataset: str, class_id: int, *,
                     root: str | os.PathLike | None = None, train: bool = True, num_classes: int | None = None,
                     meta: dict[str, Any] | None = None) -> "ClassJob":
        """A job on class ``class_id`` of a named dataset, loaded where it runs; ``num_classes`` and ``meta``
        default to the dataset's (``dataset_info(dataset)``)."""
        from .data import dataset_info

        info = dataset_info(dataset)
        source = DatasetClass(info.name, class_id, None if root is None else str(root), train)
        return cls(method, options, ipc, seed, None, None, info.num_classes if num_classes is None else num_classes,
                   info.meta() if meta is None else meta, source)

    def distiller(self) -> _distill.Distiller:
        """The configured distiller (raises ``ValueError`` for a bad method or option)."""
        clash = {"ipc", "seed", "progress"} & set(self.options)
        if clash:
            raise ValueError(f"options must not set {sorted(clash)}: the job's own fields choose them")
        try:
            return _distill.make(self.method, ipc=self.ipc, seed=self.seed, progress=False, **self.options)
        except TypeError as exc:
            raise ValueError(f"method {self.method!r} does not take options {sorted(self.options)}: {exc}") from None

    def run(self) -> SyntheticBuffer:
        """Distill this job in the calling process (loading its class first if it has a ``source``)."""
        job = _with_data([self])[0] if self.images is None else self
        part = job.distiller().distill(job.images, job.labels, num_classes=job.num_classes, meta=job.meta)
        part.meta = json.loads(json.dumps(part.meta))  # the same metadata whichever path carried the part
        return part

    def describe(self) -> str:
        classes = [self.source.cls] if self.images is None else sorted(int(c) for c in torch.unique(self.labels))
        return f"method {self.method!r}, classes {classes}, ipc {self.ipc}, seed {self.seed}"


def _with_data(jobs: Sequence[ClassJob]) -> list[ClassJob]:
    """The jobs with tensors: each dataset split named by a ``source`` is loaded once, then sliced per class."""
    from dataclasses import replace

    loaded: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    out = []
    for job in jobs:
        if job.images is not None:
            out.append(job)
            continue
        src = job.source
        key = (src.dataset, src.root, src.train)
        if key not in loaded:
            from .data import load_tensors

            loaded[key] = load_tensors(src.dataset, train=src.train, root=src.root)
        x, y = loaded[key]
        keep = y == src.cls
        out.append(replace(job, images=x[keep], labels=y[keep], source=None))
    return out


def assign_ranks(num_jobs: int, world_size: int) -> list[int]:
    """The rank that runs each job: round robin, so every rank computes the same assignment."""
    return [i % world_size for i in range(num_jobs)]


def distill_per_class(
    jobs: Sequence[ClassJob],
    *,
    workers: int | None = None,
    group: dist.ProcessGroup | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    all_ranks: bool = False,
    start_method: str = "spawn",
) -> list[SyntheticBuffer]:
    """Run ``jobs`` and return their buffers in job order, bit-identical for any number of workers.

    Args:
        jobs: the calls to make; with ``group`` every rank must pass the same list.
        workers: ``None``: run here with the caller's intra-op threads; ``1``: run here with one
            thread; ``N > 1``: start N local worker processes (elastic launch, gloo, one thread
            each); the jobs' options and metadata must then be JSON. Any ``N >= 1`` gives the same
            bytes: the thread count can change a sum's rounding (it does for MNIST-sized images).
            Jobs with a ``source`` reach the workers as a name and a class id (each worker loads
            its own classes); jobs with tensors go through a temporary safetensors file.
        group: an initialised process group to shard over instead (gloo, or nccl with each
            rank's CUDA device set). Rank 0 gets the full list, the other ranks an empty one
            unless ``all_ranks`` (then rank 0 sends every rank the full list: e.g. each rank of a
            data-parallel training holds the same buffer).
        timeout: seconds a rank waits for another at an exchange point (see :data:`DEFAULT_TIMEOUT`).
        start_method: how ``workers=N`` starts its processes, one of :data:`START_METHODS`
            ("fork" only from a caller that has not run parallel torch work yet).
    Raises ``ValueError`` for bad jobs or arguments and :class:`DistributedDistillError` when a
    rank's job raised or a rank died or hung (naming the rank).
    """
    jobs = list(jobs)
    _check_jobs(jobs)
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    check_positive_int("workers", workers, allow_none=True)
    if start_method not in START_METHODS:
        raise ValueError(f"start_method must be one of {START_METHODS}, got {start_method!r}")
    if group is not None:
        if workers not in (None, 1):
            raise ValueError("pass either a process group or workers=N, not both: the group's ranks are the workers")
        return _run_in_group(jobs, group, float(timeout), all_ranks)
    if workers is None or workers == 1:  # here; a job's own exception propagates as it is
        threads = torch.get_num_threads()
        if workers == 1:  # one worker, one thread, like each of N: the same bytes for any N
            torch.set_num_threads(1)
        try:
            ready = _with_data(jobs)
            trace("data_ready")
            parts = [ready[i].run() for i in range(len(ready))]
            trace("distilled")
        finally:
            torch.set_num_threads(threads)
        return parts
    return _launch_local(jobs, workers, float(timeout), start_method)


def merge_parts(parts: Sequence[SyntheticBuffer], **extra_meta: Any) -> SyntheticBuffer:
    """Join per-class parts into one buffer; the metadata is the first part's, with each part's seconds and their sum.

    What can differ between parts of a budget-stopped run, each part's ``iterations_done`` and ``stopped_by``, is
    kept per part (``part_iterations_done``, ``part_stopped_by``), and the joined ``iterations_done`` is the fewest
    any part ran, ``stopped_by`` the first part's reason unless another part was stopped by its time budget.
    """
    if not parts:
        raise ValueError("no parts to merge")
    meta = dict(parts[0].meta)
    meta.pop("created", None)
    if any("iterations_done" in p.meta for p in parts):
        meta["part_iterations_done"] = [p.meta.get("iterations_done") for p in parts]
        meta["iterations_done"] = min(v for v in meta["part_iterations_done"] if v is not None)
    if any("stopped_by" in p.meta for p in parts):
        meta["part_stopped_by"] = [p.meta.get("stopped_by") for p in parts]
        if "time_budget" in meta["part_stopped_by"]:
            meta["stopped_by"] = "time_budget"
    meta["part_seconds"] = [float(p.meta.get("distill_seconds", 0.0)) for p in parts]
    meta["distill_seconds"] = round(sum(meta["part_seconds"]), 3)
    meta.update(extra_meta)
    return SyntheticBuffer.concat(list(parts), meta=meta)


# ------------------------------------------------------------------ torchrun
def launched_by_torchrun() -> bool:
    """True when torchrun (or any launcher using its env:// variables) started this process."""
    return all(key in os.environ for key in _TORCHRUN_ENV)


def init_from_env(timeout: float = DEFAULT_TIMEOUT, backend: str | None = None) -> dist.ProcessGroup:
    """Initialise the default process group from torchrun's environment and return it.

    With CUDA, each rank's current device (what ``device="cuda"`` means there) is
    ``cuda:(LOCAL_RANK % GPUs)`` (:func:`rank_gpu`). ``backend`` defaults to nccl when every local rank
    has a GPU of its own; with fewer GPUs than local ranks the ranks share GPUs round-robin and
    exchange through gloo (nccl cannot put two ranks on one GPU), and an explicit ``backend="nccl"``
    raises ``ValueError`` saying so. Without CUDA: gloo. An already initialised default group is
    returned as it is.

    The ranks must join within half of ``timeout`` of each other (a rank that hangs before joining is then named
    within ``timeout``, as one that hangs later is by its heartbeat); the group's operations then wait ``timeout``.
    """
    if dist.is_initialized():
        return dist.group.WORLD
    if not launched_by_torchrun():
        missing = [key for key in _TORCHRUN_ENV if key not in os.environ]
        raise ValueError(f"not launched by torchrun: environment variables {missing} are not set")
    gpu = rank_gpu()
    shared = gpu is not None and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > torch.cuda.device_count()
    if backend == "nccl" and (gpu is None or shared):
        raise ValueError(f"backend nccl needs one CUDA device per local rank: {os.environ.get('LOCAL_WORLD_SIZE', '1')} local "
                         f"ranks, {torch.cuda.device_count() if gpu is not None else 0} CUDA device(s); use gloo "
                         "(ranks then share GPUs round-robin) or start fewer ranks")
    backend = backend or ("nccl" if gpu is not None and not shared else "gloo")
    if gpu is not None:
        torch.cuda.set_device(gpu)
    _join(backend, timeout)
    return dist.group.WORLD


def _join(backend: str, timeout: float) -> None:
    """Join the default group from the ``env://`` variables, waiting half of ``timeout`` for the other ranks; the
    group's operations and its store then wait ``timeout``."""
    join = 0.5 * timeout  # torch's rendezvous waits a second longer than it is told
    try:
        dist.init_process_group(backend, init_method="env://", timeout=_dt.timedelta(seconds=join))
    except dist.DistStoreError as exc:
        # A rank that died or hung before joining: the rendezvous only counts who came ("1/2 clients joined"); with
        # two ranks the missing one is known. Was a raw DistStoreError traceback (found by the fault runs).
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        missing = 1 - rank if world == 2 else None
        who = f"rank {missing}" if missing is not None else "a rank"
        raise DistributedDistillError(f"{who} did not join the process group within {join:g} s (it died, hung or "
                                      f"was not started): {exc}", missing) from exc
    dist.set_timeout(_dt.timedelta(seconds=timeout))
    dist.distributed_c10d._get_default_store().set_timeout(_dt.timedelta(seconds=timeout))


def rank_gpu(local_rank: int | None = None) -> int | None:
    """The GPU a local rank computes on: ``LOCAL_RANK % device_count`` (ranks share GPUs round-robin
    when there are fewer GPUs than ranks); ``None`` without CUDA."""
    if not torch.cuda.is_available():
        return None
    local = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else int(local_rank)
    return local % torch.cuda.device_count()


def _wants_cuda(jobs: Sequence[ClassJob]) -> bool:
    return any(str(job.options.get("device", "cpu")).lower().startswith(("cuda", "auto")) for job in jobs)


# ------------------------------------------------------------ the exchange
def _check_jobs(jobs: list[ClassJob]) -> None:
    if not jobs:
        raise ValueError("no jobs to distill")
    for i, job in enumerate(jobs):
        if not isinstance(job, ClassJob):
            raise TypeError(f"job {i} is a {type(job).__name__}, not a ClassJob")
        try:
            if job.images is None and job.labels is None and isinstance(job.source, DatasetClass):
                job.source.check(job.num_classes)  # the data itself is checked where it is loaded
            elif job.source is not None:
                raise ValueError("a job has either tensors or a source, not both")
            else:
                _distill.check_training_data(job.images, job.labels, job.num_classes)
            job.distiller()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"job {i} ({job.method!r}): {exc}") from None


def _run_own(jobs: list[ClassJob], rank: int, world: int) -> tuple[dict[int, SyntheticBuffer], str]:
    """Run this rank's jobs (loading the classes of those with a ``source``): the parts, or the first error."""
    mine = [i for i, owner in enumerate(assign_ranks(len(jobs), world)) if owner == rank]
    parts: dict[int, SyntheticBuffer] = {}
    try:
        ready = dict(zip(mine, _with_data([jobs[i] for i in mine])))
    except Exception as exc:  # e.g. the data is not under this rank's data root
        return parts, f"rank {rank} could not load its classes ({jobs[mine[0]].describe()}, ...): {type(exc).__name__}: {exc}"
    trace("data_ready")
    for i in mine:
        try:
            parts[i] = ready.pop(i).run()
        except Exception as exc:  # reported to every rank below, then raised there
            return parts, f"rank {rank} failed on job {i} ({jobs[i].describe()}): {type(exc).__name__}: {exc}"
    trace("distilled")
    return parts, ""


def _run_in_group(jobs: list[ClassJob], group: dist.ProcessGroup, timeout: float, all_ranks: bool = False,
                  on_silent: Any = None) -> list[SyntheticBuffer]:
    """This rank's share of the jobs and the exchange, under a heartbeat when the group has 2+ ranks.

    ``on_silent(rank, message, pid)`` is called (from the heartbeat's thread) when another rank's beat falls silent;
    by default the failure is recorded and the main thread interrupted, so that a rank still computing its own
    jobs stops at once and raises :class:`DistributedDistillError` naming the silent rank.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if world == 1:
        parts, error = _run_own(jobs, rank, world)
        if error:
            raise DistributedDistillError(error, rank)
        return [parts[i] for i in range(len(jobs))]
    beat = _Heartbeat(group, timeout, on_silent)
    ok = False
    try:
        try:
            result = _exchange(jobs, group, timeout, all_ranks, beat)
            ok = True
        finally:
            beat.stop(ok)
    except KeyboardInterrupt:  # the heartbeat's interrupt, or a real Ctrl-C (no failure recorded)
        if beat.failure is None:
            raise
        raise DistributedDistillError(*beat.failure) from None
    return result


def _exchange(jobs: list[ClassJob], group: dist.ProcessGroup, timeout: float, all_ranks: bool,
              beat: "_Heartbeat") -> list[SyntheticBuffer]:
    """Run this rank's jobs, then rank 0 gathers every part (and sends the result on if ``all_ranks``).

    Each blocking gloo transfer is entered only once the peer has reached the matching phase (see
    :meth:`_Heartbeat.await_phase`), so that a silent peer is named while this rank waits.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    owners = assign_ranks(len(jobs), world)
    parts, error = _run_own(jobs, rank, world)
    beat.set_phase("exchange")
    wire = _Wire(group, timeout)
    if rank != 0:
        beat.await_phase(0, "exchange", timeout, "take data from")
        wire.send_status(error, 0)
        if not error:
            for i in sorted(parts):
                wire.send_part(parts[i], 0)
        beat.await_phase(0, "verdict", 2 * timeout + 60, "send its verdict to")
        verdict = wire.recv_status(0, wait=2 * timeout + 60)
        if verdict:
            raise DistributedDistillError(*_decode_verdict(verdict))
        return [wire.recv_part(0) for _ in jobs] if all_ranks else []
    failure: tuple[str, int | None] | None = (error, 0) if error else None
    unreachable: set[int] = set()
    for src in range(1, world):  # hear every rank out, so that none is left blocked in a send
        try:
            beat.await_phase(src, "exchange", timeout, "send data to")
            status = wire.recv_status(src)
            if status:
                failure = failure or (status, src)
                continue
            for i in (i for i, owner in enumerate(owners) if owner == src):
                parts[i] = wire.recv_part(src)
        except DistributedDistillError as exc:
            failure = failure or (str(exc), exc.rank)
            unreachable.add(src)
    beat.set_phase("verdict")
    if failure is not None:
        wire.tell_all(json.dumps({"message": failure[0], "rank": failure[1]}), best_effort=True, skip=unreachable)
        raise DistributedDistillError(*failure)
    wire.tell_all("")
    result = [parts[i] for i in range(len(jobs))]
    for dst in range(1, world if all_ranks else 1):
        for part in result:
            wire.send_part(part, dst)
    return result


def _decode_verdict(text: str) -> tuple[str, int | None]:
    verdict = json.loads(text)
    return verdict["message"], verdict["rank"]


def _no_word_from(peer: int, me: int, what: str, seconds: float, cause: str = "") -> DistributedDistillError:
    return DistributedDistillError(
        f"rank {peer} did not {what} rank {me} within {seconds:g} s (it died, hung or is still working; raise the "
        f"timeout if ranks are unevenly loaded){': ' + cause if cause else ''}", peer)


#: The phases a rank's heartbeat announces, in order ("failed" ends a rank that raised: no phase to wait for).
_PHASES = ("work", "exchange", "verdict", "done")
_beat_calls = itertools.count()  # every rank of a group calls _run_in_group in the same order: the same keys


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").replace(" ", "")
    except OSError:  # no /proc: a peer's process cannot be looked up, only its silence counts
        return "?"


def _silence_limit(timeout: float) -> float:
    """Seconds without a heartbeat after which a rank counts as hung or dead: well inside ``timeout``, so that the
    run ends within it, and at most a minute (the beat has a thread of its own: silence is not a busy rank)."""
    return min(0.5 * timeout, 60.0)


class _Heartbeat:
    """Every rank's pulse in the default store, and every rank's watch on the others' (groups of 2+ ranks).

    Waiting for a rank's data names a hung rank only ``timeout`` s after the waiting rank's own jobs are done
    (and gloo's waits can be neither interrupted nor cut short: a timed-out wait closes the connection). Here a
    daemon thread writes ``pid host pid-namespace seq phase`` every ``period`` s -- it runs while torch computes,
    which releases the GIL -- and reads the others' beats; a rank whose beat has not changed for
    :func:`_silence_limit` s (or that never beat, counted from this rank's start), or whose process is seen to
    have ended, is reported once to ``on_silent``; on this host, a silent rank with a runnable thread is starved,
    not hung, and is not reported. A rank that ends writes "done" (or "failed") first, so that its silence is no
    alarm.
    """

    def __init__(self, group: dist.ProcessGroup, timeout: float, on_silent: Any = None) -> None:
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        call = next(_beat_calls)
        self.keys = [f"replaykit/beat/{call}/{r}" for r in dist.get_process_group_ranks(group)]
        self.limit = _silence_limit(timeout)
        self.period = min(1.0, self.limit / 12)
        self.phase, self.failure = "work", None
        self.on_silent = on_silent or self._interrupt
        self._where = f"{socket.gethostname()} {_pid_namespace()}"
        self._me = f"{os.getpid()} {self._where}"
        self._seq = 0
        self._main = threading.current_thread() is threading.main_thread()
        self._lock, self._write_lock, self._closed = threading.Lock(), threading.Lock(), threading.Event()
        try:
            self.store = dist.distributed_c10d._get_default_store()
        except (RuntimeError, ValueError):  # no default group: the exchange's own waits are all there is
            self.store = None
        self._thread = threading.Thread(target=self._run, name="replaykit-heartbeat", daemon=True)
        if self.store is not None:
            self._publish(quiet=True)
            self._thread.start()

    def _publish(self, quiet: bool = False) -> None:
        """Write this rank's beat; ``quiet``: a store out of reach is left to the watcher to report."""
        with self._write_lock:  # the phase and its sequence number go out in order, whichever thread writes
            self._seq += 1
            try:
                self.store.set(self.keys[self.rank], f"{self._me} {self._seq} {self.phase}")
            except Exception:
                if not quiet:
                    raise

    def _read(self, peer: int) -> list[str] | None:
        key = self.keys[peer]
        return self.store.get(key).decode().split() if self.store.check([key]) else None

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        if self.store is not None:
            self._publish(quiet=True)

    def _run(self) -> None:
        started, error = time.monotonic(), ""
        seen: dict[int, tuple[list[str] | None, float]] = {}
        watching = [r for r in range(self.world) if r != self.rank]
        while True:
            final = self._closed.is_set()
            try:
                self._publish()
                if final:
                    return
                for peer in list(watching):
                    beat = self._read(peer)
                    states = self._thread_states(beat) if beat else None
                    if beat and beat[4] in ("done", "failed"):
                        watching.remove(peer)
                    elif states is not None and states <= {"Z", "X"}:
                        seen[peer] = (beat, -float("inf"))  # its process has ended: named at once
                    elif beat != seen.get(peer, (None,))[0] or (states and "R" in states):
                        seen[peer] = (beat, time.monotonic())  # it beat, or it is runnable (starved, not hung)
            except Exception as exc:  # the store is out of reach: every beat ages, and the message says why
                if final:
                    return
                error = f"; the heartbeats could not be read: {type(exc).__name__}: {exc}"
            now = time.monotonic()
            for peer in watching:
                beat, since = seen.get(peer, (None, started))
                if now - since > self.limit:
                    if beat and since < 0:
                        message = f"rank {peer} (pid {beat[0]} on {beat[1]}) died: its process ended before it was done"
                    elif beat:
                        message = (f"rank {peer} (pid {beat[0]} on {beat[1]}) stopped: no heartbeat for "
                                   f"{self.limit:g} s (it hung or died){error}")
                    else:
                        message = (f"rank {peer} sent no heartbeat within {self.limit:g} s of rank {self.rank} "
                                   f"starting (it hung, died or never started its part){error}")
                    with self._lock:
                        if not self._closed.is_set():
                            self.on_silent(peer, message, int(beat[0]) if beat else None)
                    return
            self._closed.wait(self.period)

    def _thread_states(self, beat: list[str]) -> set[str] | None:
        """The states of the threads of a beat's process when it runs here (same host and pid namespace), else
        ``None``. No thread left, or zombies only: it died, and is named at once (as gloo did when its connection
        closed). A runnable thread: it is starved by a loaded machine, not hung, and its silence does not count."""
        if " ".join(beat[1:3]) != self._where or beat[2] == "?":
            return None
        states = set()
        for stat in Path(f"/proc/{beat[0]}/task").glob("*/stat"):
            try:
                states.add(stat.read_text().rsplit(")", 1)[1].split()[0])
            except (OSError, IndexError):
                pass  # a thread that just ended
        return states if states or not Path(f"/proc/{beat[0]}").exists() else None

    def _interrupt(self, peer: int, message: str, pid: int | None) -> None:
        """The default report: record the failure and wake the main thread wherever it is computing."""
        self.failure = (message, peer)
        if self._main:
            _thread.interrupt_main()

    def await_phase(self, peer: int, phase: str, seconds: float, what: str) -> None:
        """Return once ``peer`` has reached ``phase``, so that the gloo transfer that follows finds it there: the
        waiting is done here, where a silent peer ends it at once, and gloo waits only for data on its way."""
        if self.store is None:
            return
        deadline, pause = time.monotonic() + seconds, 0.001
        while True:
            if self.failure is not None:
                raise DistributedDistillError(*self.failure)
            try:
                beat = self._read(peer)
            except Exception:  # the watcher reports a store that stays out of reach
                beat = None
            if beat and beat[4] in _PHASES and _PHASES.index(beat[4]) >= _PHASES.index(phase):
                return
            if time.monotonic() > deadline:
                raise _no_word_from(peer, self.rank, what, seconds, f"its heartbeat says {beat[4] if beat else 'nothing'}")
            time.sleep(pause)
            pause = min(2 * pause, 0.05)

    def stop(self, ok: bool) -> None:
        """Say "done" (or "failed") and stop watching; no report can come once this has returned."""
        with self._lock:
            self.phase = "done" if ok else "failed"
            self._closed.set()
        if self._thread.is_alive():
            self._thread.join(2 * self.period + 1)  # the last beat goes out before this process moves on


class _Wire:
    """Point-to-point transfer of statuses and buffers as tensors, each wait bounded by ``timeout``."""

    def __init__(self, group: dist.ProcessGroup, timeout: float) -> None:
        self.group = group
        self.timeout = timeout
        cuda = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    def _transfer(self, start: Any, peer: int, what: str, seconds: float | None = None) -> None:
        """Run ``start()`` (an isend / irecv) and wait for it; any failure becomes an error naming ``peer``."""
        seconds = self.timeout if seconds is None else seconds
        try:
            work = start()
            if work is not None and not work.wait(_dt.timedelta(seconds=seconds)):
                raise TimeoutError("wait returned False")
        except Exception as exc:  # gloo raises RuntimeError / DistBackendError for timeouts and dead peers
            raise _no_word_from(peer, dist.get_rank(self.group), what, seconds, f"{type(exc).__name__}: {exc}") from exc

    def _send(self, tensor: torch.Tensor, dst: int) -> None:
        tensor = tensor.to(self.device).contiguous()
        self._transfer(lambda: dist.isend(tensor, group=self.group, group_dst=dst), dst, "take data from")

    def _recv(self, shape: Sequence[int], dtype: torch.dtype, src: int, wait: float | None = None) -> torch.Tensor:
        tensor = torch.empty(tuple(shape), dtype=dtype, device=self.device)
        if tensor.numel():
            self._transfer(lambda: dist.irecv(tensor, group=self.group, group_src=src), src, "send data to", wait)
        return tensor.cpu()

    def send_status(self, message: str, dst: int) -> None:
        data = _text_tensor(message)
        self._send(torch.tensor([int(bool(message)), data.numel()], dtype=torch.int64), dst)
        if data.numel():
            self._send(data, dst)

    def recv_status(self, src: int, wait: float | None = None) -> str:
        failed, length = (int(v) for v in self._recv((2,), torch.int64, src, wait))
        return self._recv((length,), torch.uint8, src).numpy().tobytes().decode() if failed else ""

    def tell_all(self, message: str, best_effort: bool = False, skip: set[int] = frozenset()) -> None:
        for dst in range(1, dist.get_world_size(self.group)):
            if dst in skip:
                continue
            try:
                self.send_status(message, dst)
            except DistributedDistillError:
                if not best_effort:
                    raise

    def send_part(self, part: SyntheticBuffer, dst: int) -> None:
        meta = _text_tensor(json.dumps(part.meta, sort_keys=True))
        soft_columns = part.labels.shape[1] if part.is_soft else 0
        header = [0, len(part), *part.image_shape, soft_columns, part.num_classes, meta.numel()]
        self._send(torch.tensor(header, dtype=torch.int64), dst)
        for tensor in (part.images, part.labels, part.class_ids, meta):
            if tensor.numel():
                self._send(tensor, dst)

    def recv_part(self, src: int) -> SyntheticBuffer:
        _, n, c, h, w, soft_columns, num_classes, meta_len = (int(v) for v in self._recv((_HEADER_LEN,), torch.int64, src))
        images = self._recv((n, c, h, w), torch.float32, src)
        labels = self._recv((n, soft_columns), torch.float32, src) if soft_columns else self._recv((n,), torch.int64, src)
        class_ids = self._recv((n,), torch.int64, src)
        meta = json.loads(self._recv((meta_len,), torch.uint8, src).numpy().tobytes().decode())
        return SyntheticBuffer(images, labels, num_classes, class_ids, meta)


def _text_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8) if text else torch.zeros(0, dtype=torch.uint8)


# ------------------------------------------------------- local elastic launch
_JOBS_FILE, _RESULT_FILE, _FAILURE_FILE = "jobs.safetensors", "result.safetensors", "failure.{rank}.json"
_PID_FILE = "pid.{rank}"  # each local worker's process id, for a peer that finds it hung


def _launch_local(jobs: list[ClassJob], workers: int, timeout: float, start_method: str = "spawn") -> list[SyntheticBuffer]:
    """Start ``workers`` processes with torch's elastic launch API; jobs and results go through safetensors files."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with tempfile.TemporaryDirectory(prefix="replaykit-distributed-") as tmp:
        _write_jobs(jobs, Path(tmp) / _JOBS_FILE)
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=workers, run_id=f"replaykit-{uuid.uuid4().hex[:12]}",
            rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
            start_method=start_method, shutdown_timeout=2,  # a failed run has nothing to save: SIGKILL after 2 s, not 30
        )
        trace("launch")
        agent_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
        agent_log.addFilter(_without_traceback)
        try:
            if start_method == "fork":  # the caller's interpreter, torch and replaykit already imported
                elastic_launch(config, entrypoint=_worker_main)(tmp, repr(timeout))
            else:
                elastic_launch(config, entrypoint=sys.executable)("-m", "replaykit.distributed", tmp, repr(timeout))
        except ChildFailedError as exc:
            # rank 0's verdict names the culprit; else another rank's (rank 0 was lost); else the launcher's record
            verdicts = sorted(Path(tmp).glob(_FAILURE_FILE.format(rank="*")), key=lambda f: int(f.name.split(".")[1]))
            raise DistributedDistillError(*_decode_verdict(verdicts[0].read_text())) if verdicts else _launch_error(exc) from None
        finally:
            agent_log.removeFilter(_without_traceback)
        trace("workers_done")
        parts = _read_parts(Path(tmp) / _RESULT_FILE)
        trace("parts_read")
        return parts


def _without_traceback(record: logging.LogRecord) -> bool:
    """Log the agent's "worker failed" line without its traceback (of the agent's own poll, not the worker's):
    torch's log formatter imports torch._dynamo to format one, which held a failed run 2-12 s (found by the fault runs)."""
    record.exc_info = record.exc_text = None
    return True


def _launch_error(exc: Any) -> DistributedDistillError:
    """The first worker to fail, with its recorded error or else its exit code or signal.

    Once one worker failed the agent SIGTERMs the others and records them as failed too, a second or so later
    (timestamps are whole seconds): a worker ended by SIGTERM is named only if no other worker failed.
    """
    rank, failure = min(exc.failures.items(), key=lambda item: (item[1].exitcode == -signal.SIGTERM, item[1].timestamp))
    if failure.exitcode < 0:
        return DistributedDistillError(f"worker rank {rank} died (signal {failure.signal_name()}) before delivering its parts", rank)
    recorded = (failure.error_file_data or {}).get("message", {})
    message = recorded.get("message") if isinstance(recorded, dict) else None
    return DistributedDistillError(f"worker rank {rank} failed (exit code {failure.exitcode}): {message or 'no error recorded'}", rank)


def _write_jobs(jobs: list[ClassJob], path: Path) -> None:
    """One safetensors file: every job's spec as JSON metadata, the tensors of the jobs that carry them."""
    from safetensors.torch import save_file

    specs = []
    for i, job in enumerate(jobs):
        spec = {"method": job.method, "options": job.options, "ipc": job.ipc, "seed": job.seed,
                "num_classes": job.num_classes, "meta": job.meta}
        if job.source is not None:
            spec["source"] = job.source.to_json()
        try:
            specs.append(json.loads(json.dumps(spec)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"job {i}: options and meta must be JSON to reach worker processes: {exc}") from None
    tensors = {}
    for i, job in enumerate(jobs):
        if job.images is not None:
            tensors[f"{i}.images"] = job.images.float().contiguous()
            tensors[f"{i}.labels"] = job.labels.contiguous()
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"jobs": json.dumps(specs)}))


def _read_jobs(path: Path, rank: int, world: int) -> list[ClassJob]:
    """All jobs, with real tensors only for this rank's own (the others' are never distilled here).

    A job with a ``source`` stays a name and a class id; this rank loads its own such classes when it runs them.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        specs = json.loads(handle.metadata()["jobs"])
        owners = assign_ranks(len(specs), world)
        jobs = []
        for i, spec in enumerate(specs):
            source = DatasetClass.from_json(spec["source"]) if spec.get("source") else None
            mine = owners[i] == rank
            if source is not None:
                images = labels = None
            else:
                images = handle.get_tensor(f"{i}.images") if mine else torch.zeros(1, 1, 1, 1)
                labels = handle.get_tensor(f"{i}.labels") if mine else torch.zeros(1, dtype=torch.int64)
            jobs.append(ClassJob(spec["method"], spec["options"], spec["ipc"], spec["seed"], images, labels,
                                 spec["num_classes"], spec["meta"], source))
    return jobs


def _write_parts(parts: list[SyntheticBuffer], path: Path) -> None:
    from safetensors.torch import save_file

    tensors, specs = {}, []
    for i, part in enumerate(parts):
        tensors.update({f"{i}.images": part.images, f"{i}.labels": part.labels, f"{i}.class_ids": part.class_ids})
        specs.append({"num_classes": part.num_classes, "meta": part.meta})
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"parts": json.dumps(specs)}))


def _read_parts(path: Path) -> list[SyntheticBuffer]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        specs = json.loads(handle.metadata()["parts"])
        return [
            SyntheticBuffer(handle.get_tensor(f"{i}.images"), handle.get_tensor(f"{i}.labels"), spec["num_classes"],
                            handle.get_tensor(f"{i}.class_ids"), spec["meta"])
            for i, spec in enumerate(specs)
        ]


def _worker_main(workdir: str, timeout: str, imported_at: float | None = None) -> None:
    """One local worker: join the launch's gloo group, run this rank's jobs, rank 0 writes the parts."""
    from .runtime import keep_freed_memory

    _trace_events.clear()  # a forked worker starts with its parent's events
    # A forked worker inherits the agent's handlers, which raise SignalException: the agent's SIGTERM to a survivor
    # of a failed run then failed that survivor's job, and its verdict named it instead of the worker that died.
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if imported_at is not None:
        trace("worker_import", imported_at)
    trace("worker_start")
    torch.set_num_threads(1)
    keep_freed_memory()
    seconds = float(timeout)
    rank = int(os.environ["RANK"])
    # Whole or absent, never a prefix: a peer reading a half-written pid would SIGKILL some other process.
    atomic_write_bytes(Path(workdir) / _PID_FILE.format(rank=rank), str(os.getpid()).encode())

    def verdict(message: str, peer: int | None) -> None:
        atomic_write_json(Path(workdir) / _FAILURE_FILE.format(rank=rank), {"message": message, "rank": peer})

    def give_up(peer: int | None, message: str, pid: int | None = None) -> None:
        """A silent or absent peer: leave the verdict for the parent, kill the hung worker (a stopped process never
        acts on SIGTERM, and the launcher waits 30 s before its SIGKILL) and end this one, so that the run ends now."""
        verdict(message, peer)
        try:
            os.kill(int((Path(workdir) / _PID_FILE.format(rank=peer)).read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass  # no rank named, no pid written yet, or gone already
        os._exit(1)

    try:
        _join("gloo", seconds)
    except DistributedDistillError as exc:
        give_up(exc.rank, str(exc))
    trace("group_joined")

    try:
        world = dist.get_world_size()
        jobs = _read_jobs(Path(workdir) / _JOBS_FILE, rank, world)
        if _wants_cuda(jobs) and rank_gpu() is not None:  # "cuda" in a job means this worker's GPU (round-robin)
            torch.cuda.set_device(rank_gpu())
        try:
            parts = _run_in_group(jobs, dist.group.WORLD, seconds, on_silent=give_up)
        except DistributedDistillError as exc:  # every rank that can be reached knows it: tell the parent, quietly
            verdict(str(exc), exc.rank)
            # Rank 0 (or whoever lost rank 0) exits non-zero, so that the agent stops a rank that still hangs;
            # the others exit cleanly, leaving rank 0 time to write its verdict.
            sys.exit(1 if rank == 0 or exc.rank == 0 else 0)
        trace("exchanged")
        if rank == 0:
            _write_parts(parts, Path(workdir) / _RESULT_FILE)
            trace("written")
    finally:
        dist.destroy_process_group()
        write_trace(f"rank{rank}")


if __name__ == "__main__":  # the spawned local workers' entry point (see _launch_local)
    from torch.distributed.elastic.multiprocessing.errors import record

    record(_worker_main)(*sys.argv[1:], imported_at=_IMPORTED_AT)
