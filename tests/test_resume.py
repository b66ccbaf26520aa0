"""Interrupted continual learning resumes to the same run (issue 25): an Avalanche run with DistilledReplayPlugin
checkpointed after experience k with Avalanche's own ``save_checkpoint``, the process SIGKILLed, restarted with
``maybe_load_checkpoint``; and a distillation that fails mid-experience leaves the held buffer as it was."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

RUN = textwrap.dedent("""
    import hashlib, json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint
    from avalanche.training.determinism.rng_manager import RNGManager
    from replaykit.continual import RunConfig, StrategySpec, make_strategy, make_stream

    job = json.loads(sys.argv[1])
    config = RunConfig(dataset="digits", epochs=2, width=8, depth=2, batch_size=32, batch_size_mem=16, seed=0)
    stream = make_stream(config)
    # dm distillation (its own seeded randomness) with held logits (they depend on the model when each class is stored)
    spec = StrategySpec("distilled", 20, "dm", method_options={"iterations": 10, "width": 8, "depth": 2},
                        recompress="select", options={"logits": True})
    RNGManager.set_random_seeds(0)
    strategy = make_strategy(spec, config)
    start = 0
    if job["mode"] == "resume":
        strategy, start = maybe_load_checkpoint(strategy, job["checkpoint"])
    for i, exp in enumerate(stream.train_stream[start:], start):
        strategy.train(exp)
        if job["mode"] == "interrupted" and i + 1 == job["k"]:
            save_checkpoint(strategy, job["checkpoint"])  # the whole strategy: model, optimizer (momentum), plugin
            os.kill(os.getpid(), signal.SIGKILL)
    results = strategy.eval(stream.test_stream)
    accuracy = [v for k, v in results.items() if k.startswith("Top1_Acc_Stream")][0]
    strategy.plugins[0].storage_policy.save(job["out"])
    params = b"".join(p.detach().numpy().tobytes() for p in strategy.model.parameters())
    print(json.dumps({"accuracy": accuracy, "start": start, "params": hashlib.sha256(params).hexdigest()}))
""")


def _run(job: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", RUN, json.dumps(job)], capture_output=True, text=True, env=env,
                          timeout=1200)


def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_accuracy_and_buffer_bytes(tmp_path):
    from safetensors import safe_open

    checkpoint = tmp_path / "checkpoint.pkl"
    whole = _run({"mode": "whole", "out": str(tmp_path / "whole.safetensors")})
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _run({"mode": "interrupted", "k": 2, "checkpoint": str(checkpoint), "out": str(tmp_path / "never.safetensors")})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert checkpoint.is_file() and not (tmp_path / "never.safetensors").exists()
    resumed = _run({"mode": "resume", "checkpoint": str(checkpoint), "out": str(tmp_path / "resumed.safetensors")})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = json.loads(whole.stdout.splitlines()[-1]), json.loads(resumed.stdout.splitlines()[-1])
    assert b["start"] == 2
    assert a["accuracy"] == b["accuracy"] and a["params"] == b["params"]
    with safe_open(tmp_path / "whole.safetensors", "np") as x, safe_open(tmp_path / "resumed.safetensors", "np") as y:
        assert sorted(x.keys()) == sorted(y.keys()) and "logits" in x.keys()
        for key in x.keys():  # every tensor byte-identical: images, labels, class ids, held logits
            assert x.get_tensor(key).tobytes() == y.get_tensor(key).tobytes(), key
        head_x, head_y = (json.loads(m.metadata()["replaykit"]) for m in (x, y))
    assert head_x["sha256"] == head_y["sha256"]  # the file's own digest of its tensors
    wall_clock = ("created", "distill_seconds")  # when it was made and how long each distillation took
    meta_x, meta_y = ({k: v for k, v in h.pop("meta").items() if k not in wall_clock} for h in (head_x, head_y))
    assert meta_x == meta_y and meta_x["experiences"] == 5
    head_x.pop("header_sha256"), head_y.pop("header_sha256")
    assert head_x == head_y


def test_a_distillation_failing_mid_experience_names_the_class_and_keeps_the_held_buffer(monkeypatch):
    from replaykit import distill
    from replaykit.avalanche import DistillationError, DistilledBuffer
    from replaykit.data import dataset_info, load_tensors

    x, y = load_tensors("digits")
    policy = DistilledBuffer(12, method="random", dataset_meta=dataset_info("digits").meta(), progress=False)
    first = (y < 2)
    policy.update_from_tensors(x[first], y[first])
    held, updates = policy.synthetic, policy._updates
    held_images = held.images.clone()
    make = distill.make

    def failing(name, **kwargs):
        distiller = make(name, **kwargs)
        original = distiller.distill

        def distill_(images, labels, **kw):
            if int(labels[0]) == 3:
                raise FloatingPointError("the matching loss became NaN")
            return original(images, labels, **kw)

        distiller.distill = distill_
        return distiller

    monkeypatch.setattr(distill, "make", failing)
    second = (y >= 2) & (y < 4)
    with pytest.raises(DistillationError, match=r"class 3 .*FloatingPointError: the matching loss became NaN"):
        policy.update_from_tensors(x[second], y[second], learner=torch.nn.Linear(1, 1))
    assert policy.synthetic is held and torch.equal(policy.synthetic.images, held_images)
    assert policy._updates == updates and policy._learner is None and len(policy.buffer) == len(held)
