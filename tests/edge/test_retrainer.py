"""The device runtime: torch-free, verifies bundles, retrains with replay, saves crash-safely, honours a memory cap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edge
from edge import BundleError, MemoryLimitError, Retrainer
from edge import bundle as bundle_module
from edge.memory import release_free_heap
from edge.retrainer import _SAFETY_MB



def _split(digits_split, classes, train=True):
    x_train, y_train, x_test, y_test = digits_split
    x, y = (x_train, y_train) if train else (x_test, y_test)
    keep = np.isin(y.numpy(), classes)
    return x[keep].numpy().astype(np.float32), y.numpy()[keep].astype(np.int64)


def test_retrainer_matches_the_exported_model_before_training(head_bundle, trained_model, digits_split):
    x, y = _split(digits_split, list(range(8)), train=False)
    retrainer = Retrainer(head_bundle)
    import torch

    with torch.no_grad():
        expected = trained_model(torch.from_numpy(x)).argmax(1).numpy()
    assert (retrainer.predict(x) == expected).mean() > 0.99
    assert retrainer.evaluate(x, y) > 0.85  # the exported model knows the old classes


def test_device_side_runs_where_torch_cannot_be_imported(head_copy, digits_split, tmp_path):
    x_new, y_new = _split(digits_split, [8, 9])
    x_test, y_test = _split(digits_split, list(range(10)), train=False)
    np.savez(tmp_path / "new.npz", x=x_new, y=y_new)
    np.savez(tmp_path / "test.npz", x=x_test, y=y_test)
    script = textwrap.dedent(f"""
        from edge.sandbox import block_torch
        block_torch()
        import json, sys
        import numpy as np
        import edge
        retrainer = edge.Retrainer({str(head_copy)!r}, memory_limit_mb=400, seed=0)
        new, test = np.load({str(tmp_path / 'new.npz')!r}), np.load({str(tmp_path / 'test.npz')!r})
        before = retrainer.evaluate(test["x"], test["y"])
        history = retrainer.fit(new["x"], new["y"], epochs=2, batch_size=32)
        after = retrainer.evaluate(test["x"], test["y"])
        retrainer.save()
        reopened = edge.Retrainer({str(head_copy)!r})
        same = bool((reopened.predict(test["x"]) == retrainer.predict(test["x"])).all())
        try:
            import torch
            torch_importable = True
        except ImportError:
            torch_importable = False
        print(json.dumps(dict(before=before, after=after, steps=history["steps"], same=same,
                              torch_importable=torch_importable,
                              torch_modules=[m for m in sys.modules if m.split(".")[0] == "torch"])))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(edge.__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["torch_importable"] is False and report["torch_modules"] == []
    assert report["steps"] == 2 * -(-len(x_new) // 32)
    assert report["after"] > report["before"] + 0.05  # it learned 8 and 9
    assert report["same"]


def test_replay_buffer_reduces_forgetting(head_bundle, digits_split):
    """Learning 8-9 with 32 new + 32 buffer samples per step keeps old classes far better than without the buffer."""
    x_new, y_new = _split(digits_split, [8, 9])
    x_old, y_old = _split(digits_split, list(range(8)), train=False)
    x_new_test, y_new_test = _split(digits_split, [8, 9], train=False)
    results = {}
    for name, replay in (("with_buffer", 32), ("without_buffer", 0)):
        retrainer = Retrainer(head_bundle, seed=0)
        retrainer.fit(x_new, y_new, epochs=3, batch_size=32, replay_batch_size=replay)
        results[name] = (retrainer.evaluate(x_old, y_old), retrainer.evaluate(x_new_test, y_new_test))
    old_with, new_with = results["with_buffer"]
    old_without, new_without = results["without_buffer"]
    assert old_with >= old_without + 0.3, results
    assert new_with >= 0.5 and new_without >= 0.9, results


def test_save_round_trips_parameters_and_momentum(head_copy, digits_split):
    x_new, y_new = _split(digits_split, [8, 9])
    retrainer = Retrainer(head_copy)
    retrainer.fit(x_new[:64], y_new[:64], epochs=1, batch_size=32)
    retrainer.save()
    reopened = Retrainer(head_copy)
    for name in retrainer.params:
        np.testing.assert_array_equal(reopened.params[name], retrainer.params[name])
    for name in retrainer.state:
        np.testing.assert_array_equal(reopened.state[name], retrainer.state[name])
    assert reopened.manifest["saves"] == 1
    assert not list(head_copy.glob("*.pending")) and not list(head_copy.glob(".*.tmp"))


def _params_of(bundle_dir: Path) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in Retrainer(bundle_dir).params.items()}


@pytest.mark.parametrize("crash_at", ["buffer_write", "manifest_write", "first_swap", "second_swap"])
def test_crash_during_save_leaves_a_consistent_bundle(crash_at, head_copy, digits_split, monkeypatch):
    x_new, y_new = _split(digits_split, [8, 9])
    old = _params_of(head_copy)
    retrainer = Retrainer(head_copy)
    retrainer.fit(x_new[:64], y_new[:64], epochs=1, batch_size=32)
    new = {k: v.copy() for k, v in retrainer.params.items()}

    class Crash(Exception):
        pass

    replaces = []
    real_replace, real_json = os.replace, bundle_module.atomic_write_json

    def fake_replace(src, dst):
        if not str(src).endswith(".pending"):  # atomic_write's own renames of temp files
            return real_replace(src, dst)
        replaces.append(dst)
        if (crash_at == "first_swap" and len(replaces) == 1) or (crash_at == "second_swap" and len(replaces) == 2):
            raise Crash("power cut")
        return real_replace(src, dst)

    def fake_json(path, obj):
        raise Crash("power cut")

    if crash_at == "buffer_write":
        monkeypatch.setattr(bundle_module, "write_tensors", lambda path, tensors: (Path(path).write_bytes(b"partial"), (_ for _ in ()).throw(Crash())))
    elif crash_at == "manifest_write":
        monkeypatch.setattr(bundle_module, "atomic_write_json", fake_json)
    else:
        monkeypatch.setattr(bundle_module.os, "replace", fake_replace)
    with pytest.raises(Crash):
        retrainer.save()
    monkeypatch.undo()

    reopened = _params_of(head_copy)  # opening must succeed: checksums consistent
    expected = new if crash_at == "second_swap" else old
    for name in expected:
        np.testing.assert_array_equal(reopened[name], expected[name])
    assert not list(head_copy.glob("*.pending"))


def _rewrite_manifest(bundle_dir: Path, change) -> None:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    change(manifest)
    bundle_module.write_manifest(bundle_dir / "manifest.json", manifest)  # a consistent forgery: its checksum "fixed" too


def test_tampered_truncated_and_mismatched_bundles_are_refused(head_copy, full_bundle, tmp_path):
    import shutil

    # One flipped byte in a graph.
    tampered = Path(shutil.copytree(head_copy, tmp_path / "tampered"))
    data = bytearray((tampered / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tampered / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        Retrainer(tampered)

    truncated = Path(shutil.copytree(head_copy, tmp_path / "truncated"))
    blob = (truncated / "buffer.safetensors").read_bytes()
    (truncated / "buffer.safetensors").write_bytes(blob[: len(blob) - 100])
    with pytest.raises(BundleError, match="truncated"):
        Retrainer(truncated)

    # A file from the full-mode bundle (other storage, other step inputs), with the manifest's checksum "fixed":
    # its step graph lacks the frozen constants the head manifest lists.
    for name, complaint in (("replay.safetensors", "images stored as float16"), ("train_step.onnx", "do not belong to this manifest")):
        swapped = Path(shutil.copytree(head_copy, tmp_path / f"swapped-{name}"))
        shutil.copy(full_bundle / name, swapped / name)
        entry = bundle_module.file_entry(swapped / name)
        _rewrite_manifest(swapped, lambda m, name=name, entry=entry: m["files"].__setitem__(name, entry))
        with pytest.raises(BundleError, match=complaint):
            Retrainer(swapped)

    broken = Path(shutil.copytree(head_copy, tmp_path / "broken"))
    (broken / "manifest.json").write_text('{"format": "replaykit-edge')
    with pytest.raises(BundleError, match="JSON"):
        Retrainer(broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json"):
        Retrainer(broken)
    with pytest.raises(FileNotFoundError):
        Retrainer(tmp_path / "nowhere")


def test_bad_inputs_are_refused_with_clear_errors(head_bundle, digits_split):
    retrainer = Retrainer(head_bundle)
    x, y = _split(digits_split, [8, 9])
    with pytest.raises(ValueError, match=r"shape \[N, 1, 8, 8\]"):
        retrainer.fit(x[:, :, :4], y)
    with pytest.raises(ValueError, match="dtype float64"):
        retrainer.fit(x.astype(np.float64), y)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        retrainer.predict(bad)
    with pytest.raises(ValueError, match="outside this bundle's classes"):
        retrainer.fit(x, np.full_like(y, 10))
    with pytest.raises(ValueError, match="empty"):
        retrainer.fit(x[:0], y[:0])
    with pytest.raises(ValueError, match="labels of shape"):
        retrainer.fit(x, y[:-1])
    with pytest.raises(ValueError, match="sum to 1"):
        retrainer.fit(x[:4], np.full((4, 10), 0.5, dtype=np.float32))
    with pytest.raises(TypeError):
        retrainer.predict(x.tolist())
    before = {k: v.copy() for k, v in retrainer.params.items()}
    for name in before:  # refused input never touched the parameters
        np.testing.assert_array_equal(before[name], retrainer.params[name])
    pixels = np.clip(np.round((x * 0.5 + 0.5) * 255), 0, 255).astype(np.uint8)  # uint8 pixels are accepted
    assert retrainer.predict(pixels).shape == (len(x),)


def test_memory_cap_is_refused_when_it_cannot_be_met(head_bundle, digits_split):
    x, y = _split(digits_split, [8, 9])
    rss = edge.current_rss_mb()
    with pytest.raises(MemoryLimitError, match="cannot be met"):
        Retrainer(head_bundle, memory_limit_mb=rss / 2)
    tight = Retrainer(head_bundle, memory_limit_mb=edge.current_rss_mb() + 40)
    # Less room than one sample's step needs, measured as the planner measures (free heap trimmed first: earlier
    # tests' freed memory would otherwise leave the cap with room to spare).
    release_free_heap()
    tight.memory_limit_mb = edge.current_rss_mb() + 1
    with pytest.raises(MemoryLimitError, match="cannot be met"):
        tight.fit(x, y, batch_size=32)
    roomy = Retrainer(head_bundle, memory_limit_mb=edge.current_rss_mb() + 200)
    history = roomy.fit(x, y, batch_size=32)
    assert (history["batch_size"], history["replay_batch_size"], history["micro_batch_size"]) == (32, 32, 64)
    assert 0 < history["planned_on_rss_mb"] <= roomy.memory_limit_mb
    assert roomy.memory_report()["sampled_peak_rss_mb"] <= roomy.memory_limit_mb
    # A cap with room for only a few samples keeps the 32 + 32 step but runs it in small micro-batches.
    small = Retrainer(head_bundle, memory_limit_mb=edge.current_rss_mb() + 200)
    per_sample_mb = small._per_sample_mb(training=True)
    release_free_heap()  # as the planner does before it reads the resident size
    small.memory_limit_mb = edge.current_rss_mb() + _SAFETY_MB + small._call_mb(0, True) + 10.5 * per_sample_mb
    assert 1 <= small.plan_micro_batch(64) <= 11
    history = small.fit(x, y, batch_size=32)
    assert history["batch_size"] == 32 and history["replay_batch_size"] == 32 and history["micro_batch_size"] <= 11


@pytest.mark.parametrize("weights", ["float32", "float16", "int8"])
@pytest.mark.parametrize("mode", ["full", "head"])
def test_a_fresh_device_process_stays_under_a_tight_cap(mnist_sized_bundles, mode, weights):
    """The whole process (VmHWM) stays under the cap through inference, training and inference again, in
    the benchmark's order (the opened model is scored before it trains: planning right after an inference
    pass once credited that pass's released memory to the step and overshot a 100 MB cap), the step kept at
    32 + 32 samples by micro-batching, with the cap ~20 samples' step memory above the opened bundle. Every
    plan fits on top of what the process holds at that moment (trimmed resident size), with the margin."""
    script = textwrap.dedent(f"""
        import json, numpy as np, edge
        from edge.memory import release_free_heap
        from edge.retrainer import _SAFETY_MB
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (256, 1, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, 256)
        r = edge.Retrainer({str(mnist_sized_bundles(mode, weights))!r}, memory_limit_mb=10_000)
        release_free_heap()
        cap = r.memory_limit_mb = edge.current_rss_mb() + 2.0 + _SAFETY_MB + r._call_mb(20, training=True)
        before = r.evaluate(x, y)
        history = r.fit(x, y, epochs=1, batch_size=32)
        held = history["planned_on_rss_mb"]
        # the micro-batch fit must have chosen on what it held: the largest whose working memory fits
        room = cap - held - _SAFETY_MB - r._call_mb(0, training=True)
        expected = min(64, int(room // r._per_sample_mb(training=True)))
        planned = held + r._call_mb(history["micro_batch_size"], training=True) + _SAFETY_MB
        after = r.evaluate(x, y)
        again = r.fit(x, y, epochs=1, batch_size=32)
        print(json.dumps(dict(cap=cap, peak=edge.peak_rss_mb(), micro=history["micro_batch_size"], planned=planned,
                              expected_micro=expected, steps=history["steps"] + again["steps"],
                              sampled=r.memory_report()["sampled_peak_rss_mb"])))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(edge.__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["steps"] == 16 and 1 <= report["micro"] < 64, report
    # fit reports the resident size it planned on; its micro-batch is exactly the largest that fits on it
    assert report["micro"] == report["expected_micro"], report
    assert report["planned"] <= report["cap"], report  # the plan made after inference fits on what is held
    # Linux keeps VmRSS / VmHWM per-thread and refreshes them lazily, so neither bounds the other exactly.
    assert max(report["sampled"], report["peak"]) <= report["cap"], report


@pytest.mark.parametrize("bundle_name", ["head_bundle", "full_bundle"])
def test_micro_batched_steps_equal_whole_batch_steps(bundle_name, request, digits_split):
    """Gradient accumulation over micro-batches is the same SGD step, up to float32 rounding.

    Compared one step at a time from the same parameters, momentum and sampler state: a trajectory over
    several steps would be a float race (a ReLU input within round-off of zero can flip between the two
    routes' kernels and move the following steps by a unit's gradient), which is not what is promised."""
    import copy

    bundle = request.getfixturevalue(bundle_name)
    x, y = _split(digits_split, [8, 9])
    whole, micro = Retrainer(bundle, seed=3), Retrainer(bundle, seed=3)
    start = {n: v.copy() for n, v in whole.params.items()}
    for k in range(3):  # the first step from zero momentum, the others from the momentum it built
        xb, yb = x[32 * k: 32 * (k + 1)], y[32 * k: 32 * (k + 1)]
        micro.params = {n: v.copy() for n, v in whole.params.items()}
        micro.state = {n: v.copy() for n, v in whole.state.items()}
        micro._rng = copy.deepcopy(whole._rng)
        h_whole = whole.fit(xb, yb, batch_size=32)
        h_micro = micro.fit(xb, yb, batch_size=32, micro_batch_size=5)
        assert h_whole["micro_batch_size"] == 64 and h_micro["micro_batch_size"] == 5 and h_whole["steps"] == 1
        assert h_whole["planned_on_rss_mb"] is None  # no cap, no memory plan
        np.testing.assert_allclose(h_micro["losses"], h_whole["losses"], rtol=1e-5, atol=1e-6)
        for name in whole.params:  # both routes changed the parameters and the momentum the same way
            np.testing.assert_allclose(micro.params[name], whole.params[name], rtol=0, atol=1e-6)
            np.testing.assert_allclose(micro.state[name] if name in micro.state else 0.0,
                                       whole.state[name] if name in whole.state else 0.0, rtol=0, atol=1e-5)
    assert max(float(np.abs(whole.state[n]).max()) for n in whole.state) > 1e-2  # momentum carried real values
    moved = max(float(np.abs(whole.params[n] - start[n]).max()) for n in whole.params)
    assert moved > 1e-3  # the steps did change the parameters
    with pytest.raises(ValueError, match="micro_batch_size"):
        whole.fit(x[:8], y[:8], micro_batch_size=0)


def test_int8_bundle_opens_dequantized_trains_and_keeps_the_float32_accuracy(int8_full_bundle, full_bundle, digits_split,
                                                                            tmp_path):
    """Per-channel int8 weights open within half a quantisation step of the float32 ones; accuracy before
    and after retraining stays within a margin measured on this data (digits, 360 test images)."""
    import shutil

    from safetensors.numpy import load_file

    quantised, exact = Retrainer(int8_full_bundle, seed=0), Retrainer(full_bundle, seed=0)
    stored = load_file(str(int8_full_bundle / "buffer.safetensors"))
    for name, value in exact.params.items():
        assert quantised.params[name].dtype == np.float32
        scale = stored.get("scale.param." + name)
        bound = 0.0 if scale is None else scale.reshape(-1, *([1] * (value.ndim - 1))) / 2 * (1 + 1e-5)
        assert (np.abs(quantised.params[name] - value) <= bound).all(), name
    x_test, y_test = _split(digits_split, list(range(10)), train=False)
    x_old, y_old = _split(digits_split, list(range(8)), train=False)
    assert abs(quantised.evaluate(x_old, y_old) - exact.evaluate(x_old, y_old)) <= 0.01
    x_new, y_new = _split(digits_split, [8, 9])
    for r in (quantised, exact):
        r.fit(x_new, y_new, epochs=2, batch_size=32)
    assert quantised.evaluate(x_test, y_test) >= exact.evaluate(x_test, y_test) - 0.03
    assert quantised.evaluate(x_old, y_old) >= exact.evaluate(x_old, y_old) - 0.03
    # Saving writes the trained (float32) parameters and the momentum; the reopened bundle is the trained one.
    bundle = Path(shutil.copytree(int8_full_bundle, tmp_path / "int8"))
    trained = Retrainer(bundle, seed=0)
    trained.fit(x_new[:64], y_new[:64], batch_size=32)
    trained.save()
    reopened = Retrainer(bundle)
    assert reopened.manifest["optimizer_state"] == "stored" and reopened.manifest["weight_storage"] == "int8"
    assert set(reopened.manifest["param_storage"].values()) == {"float32"}
    for name in trained.params:
        np.testing.assert_array_equal(reopened.params[name], trained.params[name])
        np.testing.assert_array_equal(reopened.state[name], trained.state[name])


def test_low_resolution_buffer_decodes_on_the_device_as_torch_does(low_res_head_bundle, low_res_buffer, digits_split):
    import torch

    mean, std = torch.tensor(low_res_buffer.meta["mean"]).view(1, -1, 1, 1), torch.tensor(low_res_buffer.meta["std"]).view(1, -1, 1, 1)
    pixels = (low_res_buffer.pixels() * 255).round() / 255  # the uint8 pixels the bundle stores
    expected = torch.nn.functional.interpolate((pixels - mean) / std, scale_factor=2, mode="bilinear", align_corners=False)
    retrainer = Retrainer(low_res_head_bundle)
    assert retrainer.buffer_x.shape == (len(low_res_buffer), 1, 8, 8)
    assert np.abs(retrainer.buffer_x - expected.numpy()).max() <= 1e-6
    x_new, y_new = _split(digits_split, [8, 9])
    history = retrainer.fit(x_new[:64], y_new[:64], batch_size=32)
    assert history["steps"] == 2 and np.isfinite(history["losses"]).all()


def test_tampered_weight_storage_and_decoder_entries_are_refused(int8_full_bundle, low_res_head_bundle, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    cases = [
        (int8_full_bundle, lambda m: m["param_storage"].__setitem__("classifier.weight", "float32"), "stored as int8"),
        (int8_full_bundle, lambda m: m["param_storage"].__setitem__("classifier.weight", "int4"), "storage 'int4'"),
        (int8_full_bundle, lambda m: m.__setitem__("optimizer_state", "stored"), "optimizer state"),
        (int8_full_bundle, lambda m: m.pop("weight_storage"), "weight_storage"),
        (low_res_head_bundle, lambda m: m["decoder"].__setitem__("factor", 4), "upsampled by 4"),
        (low_res_head_bundle, lambda m: m.__setitem__("decoder", None), "upsampled by 1"),
        (low_res_head_bundle, lambda m: m["decoder"].__setitem__("mode", "bicubic"), "unknown image decoder"),
    ]
    for k, (source, change, complaint) in enumerate(cases):
        bundle = Path(shutil.copytree(source, tmp_path / f"case{k}"))
        _rewrite_manifest(bundle, change)
        with pytest.raises(BundleError, match=complaint):
            Retrainer(bundle)
    # The scales removed from the buffer file, its checksum "fixed" in the manifest.
    bundle = Path(shutil.copytree(int8_full_bundle, tmp_path / "no_scales"))
    tensors = load_file(str(bundle / "buffer.safetensors"))
    del tensors["scale.param.classifier.weight"]
    save_file(tensors, str(bundle / "buffer.safetensors"))
    entry = bundle_module.file_entry(bundle / "buffer.safetensors")
    _rewrite_manifest(bundle, lambda m: m["files"].__setitem__("buffer.safetensors", entry))
    with pytest.raises(BundleError, match="lacks its float32 scales"):
        Retrainer(bundle)


# ----------------------------------------------------------------- the buffer as the host holds it
def test_bundle_carries_the_hosts_codes_and_logits_in_its_bytes(host_jpeg_bundle, host_jpeg_buffer):
    from safetensors.numpy import load_file

    from replaykit.buffer import quantize_logits

    manifest = edge.read_manifest(host_jpeg_bundle)
    replay = manifest["replay"]
    assert manifest["image_storage"] == "jpeg" and replay["jpeg_quality"] == 10 and replay["held_logits"]
    assert replay["mix"] == 0.5 and replay["logit_loss_weight"] == 0.1
    stored = load_file(str(host_jpeg_bundle / "replay.safetensors"))
    header, bodies = host_jpeg_buffer._jpeg_codes()
    assert stored["images"].tobytes() == b"".join(bytes(t.numpy()) for t in [header, *bodies])  # the very codes
    levels, scales = quantize_logits(host_jpeg_buffer.logits)
    assert np.array_equal(stored["logits"], levels.numpy()) and np.array_equal(stored["logit_scales"], scales.numpy())
    assert stored["labels"].dtype == np.uint8 and np.array_equal(stored["labels"], host_jpeg_buffer.labels.numpy())
    # bytes: the host's count plus the safetensors header, nothing else
    size = (host_jpeg_bundle / "replay.safetensors").stat().st_size
    assert replay["host_nbytes"] == host_jpeg_buffer.nbytes("jpeg") == sum(t.nbytes for t in stored.values())
    assert 0 < size - host_jpeg_buffer.nbytes("jpeg") <= 1024


def test_host_and_device_decode_every_held_code_to_equal_pixels(host_jpeg_bundle, host_jpeg_buffer, tmp_path):
    """The device (torch blocked) decodes the bundle's JPEG codes and logits to exactly the values the host replays."""
    script = textwrap.dedent(f"""
        from edge.sandbox import block_torch
        block_torch()
        import sys
        import numpy as np
        import edge
        r = edge.Retrainer({str(host_jpeg_bundle)!r})
        np.savez({str(tmp_path / 'device.npz')!r}, x=r.buffer_x, logits=r.buffer_logits, targets=r.buffer_targets)
        print("torch" in sys.modules)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(edge.__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
    device = np.load(tmp_path / "device.npz")
    assert np.array_equal(device["x"], host_jpeg_buffer.decoded_images().numpy())
    assert np.array_equal(device["logits"], host_jpeg_buffer.logits.numpy())
    assert np.array_equal(device["targets"], host_jpeg_buffer.soft_targets().numpy())


def test_steps_replay_held_logits_and_mix_codec_views_as_the_host_plugin(host_jpeg_bundle, digits_split):
    from edge.codec import view_images

    retrainer = Retrainer(host_jpeg_bundle, seed=3)
    x_new, y_new = _split(digits_split, [8, 9])
    retrainer.mix = 1.0  # every labelled row through the codec, so the rows can be checked one by one
    xb, tb, (ce, lw) = retrainer._batch(x_new[:16], retrainer._targets(y_new[:16], 16), 8)
    assert xb.shape[0] == 16 + 8 + 8  # new, replayed with labels, replayed with held logits
    assert np.array_equal(xb[:16], view_images(x_new[:16], "jpeg", 1, retrainer._mean, retrainer._std, 10))
    assert np.isclose(ce.sum(), 1.0) and (ce[24:] == 0).all() and (lw[:24] == 0).all()
    assert np.isclose(lw.sum(), 0.1 / retrainer.num_classes)  # DER: w * mean squared error over rows and classes
    held = [np.flatnonzero((retrainer.buffer_x == row).all(axis=(1, 2, 3))) for row in xb[24:]]
    assert all(np.array_equal(tb[24 + i], retrainer.buffer_logits[h[0]]) for i, h in enumerate(held))
    history = retrainer.fit(x_new[:64], y_new[:64], batch_size=16, replay_batch_size=8)
    assert history["steps"] == 4 and np.isfinite(history["losses"]).all()
    # Micro-batches give the same step (the row weights are normalised over the whole step).
    whole, parts = Retrainer(host_jpeg_bundle, seed=5), Retrainer(host_jpeg_bundle, seed=5)
    whole.fit(x_new[:32], y_new[:32], batch_size=16, replay_batch_size=8)
    parts.fit(x_new[:32], y_new[:32], batch_size=16, replay_batch_size=8, micro_batch_size=7)
    assert max(float(np.abs(whole.params[n] - parts.params[n]).max()) for n in whole.params) < 1e-5


def test_packed_grey_levels_travel_packed(trained_model, replay_buffer, tmp_path):
    from safetensors.numpy import load_file

    two_bit = replay_buffer.with_meta(pixel_bits=2).quantized("uint8")
    bundle = edge.export(trained_model, two_bit, tmp_path / "b", mode="head", verify=False)
    stored = load_file(str(bundle / "replay.safetensors"))["images"]
    assert stored.shape == (len(two_bit), 16)  # 64 pixels at 2 bits
    assert np.array_equal(Retrainer(bundle).buffer_x, two_bit.decoded_images().numpy())
    assert edge.read_manifest(bundle)["replay"]["mix"] == 0.0  # full resolution, grey levels: nothing to mix


def test_tampered_replay_entries_are_refused(host_jpeg_bundle, tmp_path):
    import shutil

    cases = [
        (lambda m: m["replay"].__setitem__("count", 3), "manifest says 3"),
        (lambda m: m["replay"].__setitem__("jpeg_header_bytes", 5), "does not decode|start-of-scan|JPEG"),
        (lambda m: m["replay"].__setitem__("label_storage", "int4"), "label storage"),
        (lambda m: m["replay"].__setitem__("mix", 2.0), "mix"),
        (lambda m: m.__setitem__("image_storage", "png"), "image storage 'png'"),
    ]
    for k, (change, complaint) in enumerate(cases):
        bundle = Path(shutil.copytree(host_jpeg_bundle, tmp_path / f"case{k}"))
        _rewrite_manifest(bundle, change)
        with pytest.raises(BundleError, match=complaint):
            Retrainer(bundle)


def test_closed_retrainer_refuses_calls_and_with_block_closes(head_bundle, digits_split):
    x, y = _split(digits_split, [8, 9])
    with Retrainer(head_bundle) as r:
        assert r.evaluate(x[:20], y[:20]) >= 0.0
    assert r.closed and r.params == {} and r._step is None and r._infer is None
    r.close()  # idempotent
    for call in (lambda: r.fit(x[:8], y[:8]), lambda: r.evaluate(x[:8], y[:8]), lambda: r.predict(x[:8]), r.save):
        with pytest.raises(edge.RetrainerClosedError, match="closed"):
            call()
    assert r.memory_report()["rss_mb"] > 0


def test_open_fit_evaluate_save_close_rounds_keep_a_flat_resident_size(mnist_sized_bundles, tmp_path):
    """A long-lived device process retrains round after round under a 100 MB cap: after the first round (which pays
    onnxruntime's one-time, process-wide setup) the resident size stays flat, and the whole process never passes the cap."""
    import shutil

    bundle = Path(shutil.copytree(mnist_sized_bundles("full", "float32"), tmp_path / "bundle"))
    script = textwrap.dedent(f"""
        import gc, json, numpy as np, edge
        from edge.memory import release_free_heap
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (64, 1, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, 64)
        rss = []
        for k in range(6):
            with edge.Retrainer({str(bundle)!r}, memory_limit_mb=100, seed=k) as r:
                r.fit(x, y, epochs=1, batch_size=32)
                r.evaluate(x, y)
                r.save()
            gc.collect(); release_free_heap()
            rss.append(edge.current_rss_mb())
        print(json.dumps(dict(rss=rss, peak=edge.peak_rss_mb())))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(edge.__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["peak"] <= 100, report
    assert abs(report["rss"][-1] - report["rss"][1]) <= 2.0, report  # round 6 vs round 2
    assert edge.read_manifest(bundle)["saves"] == 6


def _bundle_digest(bundle: Path) -> dict[str, str]:
    from replaykit.fileio import sha256_file

    return {p.name: sha256_file(p) for p in sorted(bundle.iterdir()) if p.is_file()}


def _hostile_calls(x: np.ndarray, y: np.ndarray) -> list[tuple[str, Any, type]]:
    nan = x[:16].copy()
    nan[3, 0, 2, 2] = np.nan
    inf = x[:16].copy()
    inf[0, 0, 0, 0] = -np.inf
    soft = np.full((16, 10), 0.1, np.float32)
    soft[2, 0] = np.nan
    return [
        ("NaN image", lambda r: r.fit(nan, y[:16]), ValueError),
        ("inf image", lambda r: r.fit(inf, y[:16]), ValueError),
        ("float64 images", lambda r: r.fit(x[:16].astype(np.float64), y[:16]), ValueError),
        ("int16 images", lambda r: r.fit(x[:16].astype(np.int16), y[:16]), ValueError),
        ("wrong image shape", lambda r: r.fit(np.zeros((4, 1, 9, 9), np.float32), y[:4]), ValueError),
        ("3-d images", lambda r: r.fit(x[:4, 0], y[:4]), ValueError),
        ("list of images", lambda r: r.fit(x[:4].tolist(), y[:4]), TypeError),
        ("label above the classes", lambda r: r.fit(x[:16], np.full(16, 10)), ValueError),
        ("negative label", lambda r: r.fit(x[:16], np.full(16, -1)), ValueError),
        ("labels of another length", lambda r: r.fit(x[:16], y[:15]), ValueError),
        ("float class labels", lambda r: r.fit(x[:16], y[:16].astype(np.float32)), ValueError),
        ("NaN soft labels", lambda r: r.fit(x[:16], soft), ValueError),
        ("empty batch", lambda r: r.fit(x[:0], y[:0]), ValueError),
        ("zero batch size", lambda r: r.fit(x[:16], y[:16], batch_size=0), ValueError),
        ("NaN learning rate", lambda r: r.fit(x[:16], y[:16], lr=float("nan")), ValueError),
        ("negative replay", lambda r: r.fit(x[:16], y[:16], replay_batch_size=-1), ValueError),
        ("diverging learning rate", lambda r: r.fit(x[:64], y[:64], lr=3e38), FloatingPointError),
        ("evaluate NaN image", lambda r: r.evaluate(nan, y[:16]), ValueError),
        ("evaluate label out of range", lambda r: r.evaluate(x[:16], np.full(16, 99)), ValueError),
        ("evaluate empty batch", lambda r: r.evaluate(x[:0], y[:0]), ValueError),
    ]


def test_hostile_inputs_are_refused_before_anything_changes(head_copy, digits_split):
    """Each bad call raises its named error and leaves parameters, momentum, optimizer, sampler and the bundle on disk
    exactly as they were: the next (good) fit runs as if the bad calls never happened."""
    x, y = _split(digits_split, [8, 9])
    before_disk = _bundle_digest(head_copy)
    r, clean = Retrainer(head_copy, seed=5), Retrainer(head_copy, seed=5)
    r.fit(x[:32], y[:32]), clean.fit(x[:32], y[:32])  # non-zero momentum to protect
    for name, call, error in _hostile_calls(x, y):
        with pytest.raises(error):
            call(r)
        for n in r.params:
            assert np.array_equal(r.params[n], clean.params[n]), (name, n)
        for n in r.state:
            assert np.array_equal(r.state[n], clean.state[n]), (name, n)
        assert r.optimizer == clean.optimizer, name
        assert _bundle_digest(head_copy) == before_disk, name
    a, b = r.fit(x[32:96], y[32:96]), clean.fit(x[32:96], y[32:96])
    assert a["losses"] == b["losses"]  # the sampler was not advanced by the refused calls either


def test_hostile_sizes_are_refused_under_the_cap_without_passing_it(mnist_sized_bundles, tmp_path):
    """A fresh device process: a cap below what the bundle needs is refused before it is opened, and a step far above
    the cap before its batch is assembled; VmHWM never passes the cap; the bundle's bytes are unchanged."""
    import shutil

    bundle = Path(shutil.copytree(mnist_sized_bundles("full", "float32"), tmp_path / "bundle"))
    before = _bundle_digest(bundle)
    script = textwrap.dedent(f"""
        import json, numpy as np, edge
        from edge.memory import current_rss_mb
        out = {{}}
        tight = current_rss_mb() + 6
        try:
            edge.Retrainer({str(bundle)!r}, memory_limit_mb=tight)
        except edge.MemoryLimitError as exc:
            out["tight"] = str(exc)
        out["tight_cap"], out["peak_after_tight"] = tight, edge.peak_rss_mb()
        x = np.zeros((200, 1, 28, 28), np.uint8)
        y = np.zeros(200, np.int64)
        r = edge.Retrainer({str(bundle)!r}, memory_limit_mb=100)
        try:
            r.fit(x, y, batch_size=64, replay_batch_size=1_000_000)
        except edge.MemoryLimitError as exc:
            out["huge"] = str(exc)
        out["peak"] = edge.peak_rss_mb()
        print(json.dumps(out))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(edge.__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert "cannot be met" in report["tight"] and report["peak_after_tight"] <= report["tight_cap"], report
    assert "1000064 samples" in report["huge"] and report["peak"] <= 100, report
    assert _bundle_digest(bundle) == before


def test_manifest_field_edited_without_its_checksum_is_refused(head_copy):
    """Regression (fuzzing, issue 25): the manifest's fields (normalisation, learning rate) were covered by no
    checksum, so an edited mean opened as a different model without an error."""
    manifest = json.loads((head_copy / "manifest.json").read_text())
    manifest["mean"] = [0.5]
    (head_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="own checksum"):
        Retrainer(head_copy)
    manifest["files"] = ["model.onnx"]
    bundle_module.write_manifest(head_copy / "manifest.json", manifest)
    with pytest.raises(BundleError, match="'files' must map"):
        Retrainer(head_copy)


@pytest.fixture(scope="module")
def big_jpeg_bundle(tmp_path_factory) -> Path:
    """An MNIST-sized full-mode bundle whose JPEG buffer holds 2,000 images and their logits: decoded to float32 the
    buffer alone would be 6.3 MB, as uint8 pixels 1.6 MB."""
    import torch

    from replaykit.buffer import SyntheticBuffer
    from replaykit.networks import ConvNet

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ConvNet((1, 28, 28), 10, width=8, depth=2).eval()
        images = (torch.rand(2000, 1, 28, 28) - 0.13) / 0.31
        logits = torch.randn(2000, 10)
    meta = {"mean": [0.13], "std": [0.31], "jpeg_quality": 10}
    buffer = SyntheticBuffer(images, torch.arange(2000) % 8, 10, meta=meta).quantized("jpeg").with_logits(logits)
    return edge.export(model, buffer, tmp_path_factory.mktemp("bundles") / "big_jpeg", mode="full", weights="int8",
                       mix=0.5, verify=False)


def test_replay_buffer_is_held_as_levels_and_decoded_per_step(big_jpeg_bundle):
    """Regression (issue 24): the Retrainer decoded its whole buffer to float32 at open (4x the uint8 pixels, 40x
    the JPEG codes), memory the open-time plan did not count, so a 1,452-image JPEG buffer + test data ran a
    100 MB device process out of room. Now it holds uint8 levels, decodes the rows of each step, counts what it
    holds in its plan, and scores test data chunk by chunk; traced by tracemalloc (numpy reports its arrays)."""
    import tracemalloc

    count, float32_buffer = 2000, 2000 * 28 * 28 * 4
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (256, 1, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 256)
    tracemalloc.start()
    try:
        r = Retrainer(big_jpeg_bundle, seed=0)
        opened, open_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        history = r.fit(x[:64], y[:64], batch_size=16)
        accuracy = r.evaluate(x, y)
        _, use_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert opened < float32_buffer / 2, opened
    assert r.buffer_images.nbytes == count * 28 * 28 and len(r.buffer_images) == count
    held = r.buffer_images.nbytes + r.buffer_targets.nbytes + r.buffer_logits.nbytes
    codes = (big_jpeg_bundle / "replay.safetensors").stat().st_size
    assert open_peak <= 3 * (held + codes), (open_peak, held, codes)  # reading: the codes' copies and one chunk's decode
    assert use_peak - opened < float32_buffer / 8, (use_peak, opened)
    assert history["steps"] == 4 and np.isfinite(history["losses"]).all()
    # The open-time plan counts exactly what is held for the buffer.
    assert r._replay_held_mb() == pytest.approx(held / 2**20)
    # Chunked scoring gives the accuracy of the whole prediction, for class labels and soft rows alike.
    assert accuracy == float((r.predict(x) == y).mean())
    soft = np.eye(10, dtype=np.float32)[y]
    assert r.evaluate(x, soft, batch_size=7) == accuracy
    # Rows decoded per step are the rows of the whole buffer, bit for bit.
    rows = np.array([5, 1999, 5, 0])
    assert np.array_equal(r.buffer_images.take(rows), r.buffer_x[rows])


@pytest.mark.parametrize("field,value,complaint", [
    ("input_shape", 7, "input_shape"),  # was TypeError: 'int' object is not iterable
    ("train_step_outputs", None, "lacks the field"),  # was KeyError: 'train_step_outputs'
    ("trainable", ["features.0.tures.0.1.weight"], "trainable"),  # was KeyError on a renamed parameter
    ("mean", [0.1, 0.2, 0.3], "mean"),  # three channels' normalisation for one channel
    ("optimizer", {"lr": "0.1", "momentum": 0.9, "weight_decay": 0.0}, "optimizer"),
    ("num_classes", True, "num_classes"),
    ("std", 7, "std"),  # was TypeError: 'int' object is not iterable (the check's own first version)
    ("trainable", "drop_last", "trainable and frozen must split"),  # was onnxruntime's ValueError at the first fit
    ("train_step_outputs", "reverse", "train_step_outputs"),  # outputs are zipped with trainable: silently swapped
    ("replay", {"mix": "mnist"}, "must be numbers"),  # was ValueError: could not convert string to float
])
def test_forged_manifest_fields_are_bundle_errors(head_copy, field, value, complaint):
    """Regression (fuzzing re-checksummed manifests, issue 25): a manifest whose checksum was re-made after a field
    was edited (a forger, or a buggy writer: sha256 is no signature) raised TypeError / KeyError while opening."""
    def change(m):
        if value is None:
            m.pop(field)
        elif value == "drop_last":
            m[field] = m[field][:-1]
        elif value == "reverse":
            m[field] = m[field][::-1]
        elif isinstance(value, dict):
            m[field] = {**m[field], **value}
        else:
            m[field] = value

    _rewrite_manifest(head_copy, change)
    with pytest.raises(BundleError, match=complaint):
        Retrainer(head_copy)


def test_non_finite_parameters_behind_valid_checksums_are_refused(head_copy):
    """Regression (fuzzing re-checksummed buffer.safetensors, issue 25): a flipped exponent bit made a parameter
    inf; the bundle opened and only fit found out (FloatingPointError)."""
    tensors = bundle_module.load_tensors(head_copy)
    name = next(k for k, v in tensors.items() if k.startswith("param.") and v.dtype == np.float32)
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] = np.inf
    bundle_module.write_tensors(head_copy / "buffer.safetensors", tensors)
    entry = bundle_module.file_entry(head_copy / "buffer.safetensors")
    _rewrite_manifest(head_copy, lambda m: m["files"].__setitem__("buffer.safetensors", entry))
    with pytest.raises(BundleError, match="NaN or infinite"):
        Retrainer(head_copy)


def test_a_graph_that_fails_to_run_is_a_bundle_error(head_copy, digits_split):
    """Regression (fuzzing re-checksummed model.onnx, issue 25): a graph changed behind re-made checksums loaded, then
    failed in a Reshape at inference with onnxruntime's own Fail; the Retrainer now names the bundle."""
    import onnxruntime as ort

    x, y = _split(digits_split, [0, 1])
    with Retrainer(head_copy) as r:
        class Broken:
            def run(self, *args, **kwargs):
                raise ort.capi.onnxruntime_pybind11_state.Fail("Non-zero status code returned while running Reshape node")

        r._infer = r._step = Broken()
        before = {k: v.copy() for k, v in r.params.items()}
        with pytest.raises(BundleError, match="failed to run"):
            r.predict(x[:4])
        with pytest.raises(BundleError, match="failed to run"):
            r.fit(x[:8], y[:8], batch_size=8)
        assert all(np.array_equal(before[k], r.params[k]) for k in before)


def test_a_manifest_without_its_checksum_is_refused(head_copy):
    """Regression (fuzzing, issue 25): a manifest without manifest_sha256 was read as one written before the checksum
    existed, so a flipped bit in the key's name (or a deleted stretch taking the key with it) let other damage in."""
    manifest = json.loads((head_copy / "manifest.json").read_text())
    digest = manifest.pop("manifest_sha256")
    manifest["manifesp_sha256"] = digest
    manifest["replay"]["mix"] = 0.25
    (head_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="has no 'manifest_sha256'"):
        Retrainer(head_copy)
