"""PROTOCOL part C: on-device retraining with an ONNX bundle vs the same step in PyTorch eager.

One run, same CPU, per seed:
  1. train a ConvNet briefly on MNIST classes 0-7 (10 outputs: room for 8 and 9);
  2. distil a 100-image replay buffer of the old classes (``--buffer-method``);
  3. export head- and full-mode bundles (uint8 buffer) per weight storage (``--weights``: float32,
     float16, per-channel int8);
  4. parity: 50 steps of 32 new + 32 buffer samples in onnxruntime and PyTorch eager (both started from
     the weights as the device opens them), max |param diff|, beside two references that size float32
     round-off: PyTorch with oneDNN off, and PyTorch in float64; at every step also one step from PyTorch's
     state: ORT, PyTorch with oneDNN on and off, each against the float64 step, and at the worst step the
     ReLU inputs whose sign ORT's float32 forward gets wrong;
  5. PyTorch eager step latency (this process) and the device side in a separate process where
     torch cannot be imported: step latency, peak resident memory (VmHWM), accuracy of the opened
     model, accuracy on old / new classes after learning 8-9 with the buffer and without it;
  6. at ``--wide-width`` (PROTOCOL's 128): train that ConvNet too, and per weight storage report the
     bundle size (head, full) and the opened model's accuracy on the old classes.

    python benchmarks/edge_retrain.py --quick            # CI smoke (~1-2 min)
    flock /tmp/replaykit-bench.lock python benchmarks/edge_retrain.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import edge  # noqa: E402
from edge.bundle import PARAM_PREFIX, STATE_PREFIX, TRAIN_STEP, open_parameters, step_session  # noqa: E402
from edge.bundle import load_tensors as load_bundle_tensors  # noqa: E402
from edge.codec import WEIGHT_STORAGES  # noqa: E402
from edge.exporter import soft_cross_entropy  # noqa: E402
from edge.exporter import torch_step as eager_step  # noqa: E402
from replaykit.data import dataset_info, load_tensors  # noqa: E402
from replaykit.device import add_device_argument, resolve_device  # noqa: E402
from replaykit.fileio import atomic_write, atomic_write_bytes, atomic_write_json  # noqa: E402
from replaykit.networks import ConvNet  # noqa: E402
from replaykit.training import seeded, train_classifier  # noqa: E402

OLD, NEW = list(range(8)), [8, 9]
#: Replay buffers compared at the headline bytes (PROTOCOL A's 100 uint8 MNIST images + labels).
BUFFER_KINDS = ("host-headline", "uint8-100")
HEADLINE_BYTES = 78_500

# Runs in a child process: torch is blocked, only numpy + onnxruntime + safetensors + edge.
DEVICE_SCRIPT = textwrap.dedent("""
    from edge.sandbox import block_torch
    block_torch()
    import json, statistics, sys
    import numpy as np
    import edge
    job = json.loads(sys.argv[1])
    with np.load(job["new"]) as new:
        x_new, y_new = new["x"], new["y"]

    def accuracy(r, key, chunk=1024):  # test data streamed from disk in chunks while it is scored, as a device reads it
        labels = np.load(job[key] + "_y.npy")
        correct = 0
        for start in range(0, len(labels), chunk):
            x = np.array(np.load(job[key] + "_x.npy", mmap_mode="r")[start: start + chunk])  # unmapped with the view
            correct += int((r.predict(x) == labels[start: start + chunk]).sum())
        return correct / len(labels)

    report = {}
    for replay in job["replays"]:
        r = edge.Retrainer(job["bundle"], memory_limit_mb=job["memory_limit_mb"], seed=job["seed"], threads=job["threads"])
        if job["score"] and "opened_old_acc" not in report:  # the opened model, before any retraining
            report["opened_old_acc"] = accuracy(r, "old_test")
        h = r.fit(x_new, y_new, epochs=job["epochs"], batch_size=32, replay_batch_size=replay)
        times = h["step_seconds"][job["warmup"]:] or h["step_seconds"]
        scores = dict(old_acc=accuracy(r, "old_test"), new_acc=accuracy(r, "new_test")) if job["score"] else {}
        report["with_buffer" if replay else "without_buffer"] = dict(
            **scores, steps=h["steps"], step_ms_median=1000 * statistics.median(times), final_loss=h["losses"][-1],
            batch=[h["batch_size"], h["replay_batch_size"]], micro_batch=h["micro_batch_size"])
        del r  # one retrainer at a time, as on a device
    report["peak_rss_mb"] = edge.peak_rss_mb()
    report["torch_loaded"] = any(m.split(".")[0] == "torch" for m in sys.modules)
    print(json.dumps(report))
""")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI smoke: small data, one seed, few steps")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0 1 2; --quick: 0)")
    p.add_argument("--seed", type=int, default=None, help="a single seed (same as --seeds N)")
    p.add_argument("--out", default=None, help="output folder (default runs/edge_retrain[_quick])")
    p.add_argument("--width", type=int, default=32, help="ConvNet width of the retraining runs (PROTOCOL's 128 is --wide-width: sizes and opened accuracy)")
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--buffer-method", default="random", help="distillation method for the replay buffer (random, dm, ...)")
    p.add_argument("--buffer-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=2, help="threads for both PyTorch and onnxruntime")
    p.add_argument("--parity-steps", type=int, default=None, help="steps compared with PyTorch (default 50; quick 10)")
    p.add_argument("--parity-lrs", type=float, nargs="+", default=[0.01, 0.001],
                   help="learning rates of the parity runs (the first is the bundle's and the headline)")
    p.add_argument("--latency-steps", type=int, default=None, help="timed PyTorch steps (default 60; quick 15)")
    p.add_argument("--memory-limit-mb", type=float, default=100.0,
                   help="cap given to the device Retrainer (PROTOCOL C's goal: 100 MB)")
    p.add_argument("--weights", nargs="+", default=list(WEIGHT_STORAGES), choices=WEIGHT_STORAGES,
                   help="weight storages to export and compare (the first is the reference; default all)")
    p.add_argument("--wide-width", type=int, default=None,
                   help="also train a ConvNet of this width: bundle sizes and opened accuracy per storage "
                        "(default 128; quick: none)")
    p.add_argument("--wide-epochs", type=int, default=1, help="base-training epochs of the wide model")
    p.add_argument("--buffers", nargs="*", default=None, choices=BUFFER_KINDS,
                   help="also compare replay buffers of the headline bytes on the device (full mode, int8 weights): "
                        "host-headline = the host's best buffer (dm, JPEG q2, held logits, mix 0.5, 78,500 B), "
                        "uint8-100 = 100 uint8 images (default: both; --quick: none unless asked)")
    p.add_argument("--only-buffers", action="store_true", help="run only the buffer comparison (no parity, latency, wide run)")
    p.add_argument("--buffer-iterations", type=int, default=None, help="dm iterations per class of host-headline (default 100; quick 5)")
    p.add_argument("--copy-json", default=None,
                   help="merge this run's buffer rows into this results document (e.g. benchmarks/results/edge_retrain.json), "
                        "replacing its rows of the same buffer and seed")
    p.add_argument("--data-root", default=None)
    p.add_argument("--no-keep-freed-memory", dest="keep_freed_memory", action="store_false",
                   help="leave glibc malloc at its defaults in this (PyTorch) process; by default it keeps freed memory "
                        "(replaykit.runtime.keep_freed_memory), the fastest PyTorch CPU setting. The device processes "
                        "never use it: there a small resident set matters")
    add_device_argument(p, "the base models train and the buffer is distilled (the edge step and its PyTorch "
                           "reference always run on the CPU, as on an edge device)")
    args = p.parse_args(argv)
    if args.seed is not None:
        args.seeds = [args.seed]
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    if args.out is None:
        args.out = str(REPO / "runs" / ("edge_retrain_quick" if args.quick else "edge_retrain"))
    if args.latency_steps is None:
        args.latency_steps = 10 if args.quick else 60
    if args.parity_steps is None:
        args.parity_steps = 10 if args.quick else 50
    if args.wide_width is None:
        args.wide_width = 0 if args.quick or args.only_buffers else 128
    if args.buffers is None:
        args.buffers = list(BUFFER_KINDS) if args.only_buffers or not args.quick else []
    if args.buffer_iterations is None:
        args.buffer_iterations = 5 if args.quick else 100
    return args


def _settings(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(base_train=1600, base_epochs=1, new_per_class=64, test_per_class=50, device_epochs=1, distill_pool=400)
    return dict(base_train=12000, base_epochs=2, new_per_class=500, test_per_class=None, device_epochs=2, distill_pool=3000)


def _take(x, y, classes, per_class, gen):
    idx = []
    for c in classes:
        where = torch.nonzero(y == c).flatten()
        where = where[torch.randperm(len(where), generator=gen)]
        idx.append(where if per_class is None else where[:per_class])
    index = torch.cat(idx)
    return x[index], y[index]


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _normalise_uint8(x: np.ndarray, info) -> torch.Tensor:
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return (torch.from_numpy(x).float() / 255.0 - mean) / std


def _bundle_bytes(bundle: Path) -> dict[str, int]:
    sizes = {p.name: p.stat().st_size for p in bundle.iterdir() if p.is_file()}
    sizes["total"] = sum(sizes.values())
    return sizes


def _batches(x_new: torch.Tensor, y_new: torch.Tensor, buf_x: torch.Tensor, buf_t: torch.Tensor, steps: int, seed: int):
    """The same sequence of 32 new + 32 buffer batches for onnxruntime and PyTorch."""
    rng = np.random.default_rng(seed)
    onehot = torch.nn.functional.one_hot(y_new, 10).float()
    for _ in range(steps):
        i = torch.from_numpy(rng.choice(len(x_new), 32, replace=False))
        j = torch.from_numpy(rng.choice(len(buf_x), 32, replace=len(buf_x) < 32))
        yield torch.cat([x_new[i], buf_x[j]]), torch.cat([onehot[i], buf_t[j]])


def _torch_trainer(model: torch.nn.Module, mode: str, lr: float, opt: dict, onednn: bool = True,
                   dtype: torch.dtype = torch.float32):
    """The PyTorch eager step a user would write: frozen features in head mode, torch.optim.SGD.

    ``onednn=False`` runs the same step with PyTorch's oneDNN (mkldnn) kernels switched off and
    ``dtype=torch.float64`` in double precision: two references that tell the graph's error
    apart from float32 round-off amplified by training."""
    import copy

    net = copy.deepcopy(model).to(dtype).train()
    for name, p in net.named_parameters():
        p.requires_grad_(mode == "full" or name.startswith("classifier."))
    params = [p for p in net.parameters() if p.requires_grad]
    sgd = torch.optim.SGD(params, lr=lr, momentum=opt["momentum"], weight_decay=opt["weight_decay"])
    net._sgd = sgd

    def step(x, t):
        with torch.backends.mkldnn.flags(enabled=onednn):
            sgd.zero_grad(set_to_none=True)
            loss = soft_cross_entropy(net(x.to(dtype)), t.to(dtype))
            loss.backward()
            sgd.step()
        return float(loss.detach())

    return net, step


def _momentum(net, name: str):
    param = dict(net.named_parameters())[name]
    buf = net._sgd.state.get(param, {}).get("momentum_buffer")
    return None if buf is None else buf.detach().clone()


def _mean_weights(rows: int) -> dict[str, np.ndarray]:
    """The step graph's row weights of a plain step (the batch mean of the cross-entropy, no logit rows)."""
    return {"ce_weight": np.full(rows, 1.0 / rows, dtype=np.float32), "logit_weight": np.zeros(rows, dtype=np.float32)}


def _max_diff(a: dict, b: dict, names) -> float:
    as_np = lambda v: v.detach().double().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, np.float64)  # noqa: E731
    return max(float(np.abs(as_np(a[n]) - as_np(b[n])).max()) for n in names)


@contextlib.contextmanager
def _recording_relu_inputs(net: torch.nn.Module):
    """Yields a list that collects every ReLU module's input of the forward passes run inside the block."""
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].detach().clone()))
             for m in net.modules() if isinstance(m, torch.nn.ReLU)]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def _float64_step(net, trainable, x, t, lr: float, opt: dict) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """torch.optim.SGD's update computed in float64 from ``net``'s current float32 parameters and momentum:
    the exact step both float32 implementations round (PyTorch's own round-off is its distance to it); and
    every ReLU input of its float64 forward, the reference for each side's ReLU signs."""
    import copy

    exact = copy.deepcopy(net).double()
    named = dict(exact.named_parameters())
    with _recording_relu_inputs(exact) as relu_inputs:
        loss = soft_cross_entropy(exact(x.double()), t.double())
    grads = torch.autograd.grad(loss, [named[n] for n in trainable])
    out = {}
    for name, grad in zip(trainable, grads):
        buf = _momentum(net, name)
        param = named[name].detach()
        velocity = grad + opt["weight_decay"] * param
        if buf is not None:  # torch.optim.SGD's first step takes the gradient as the momentum buffer
            velocity = opt["momentum"] * buf.double() + velocity
        out[name] = param - lr * velocity
    return out, relu_inputs


def _relu_probe(bundle: Path, manifest: dict, params: dict[str, np.ndarray], threads: int):
    """The bundle's step graph with every ReLU input as an extra output: (session, names of those inputs in graph
    order). Head mode's frozen weights are supplied as in ``step_session``."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(bundle / TRAIN_STEP), load_external_data=False)
    relu_inputs = [node.input[0] for node in proto.graph.node if node.op_type == "Relu"]
    for name in relu_inputs:
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    frozen = sorted(init.name for init in proto.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL)
    values = [np.ascontiguousarray(params[name[len(PARAM_PREFIX):]], dtype=np.float32) for name in frozen]
    if frozen:
        options.add_external_initializers(frozen, [ort.OrtValue.ortvalue_from_numpy(v) for v in values])
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.frozen_constants = values  # keep the memory onnxruntime was given alive
    return session, relu_inputs


def _relu_inputs_float32(model: torch.nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """Every ReLU module's input in PyTorch eager's float32 forward pass from ``params``."""
    from torch.func import functional_call

    with _recording_relu_inputs(model) as seen, torch.no_grad():
        functional_call(model, params, (x,))
    return seen


def _in_graph_layout(ref: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    """A float64 ReLU input [N, C, H, W] laid out as the step graph holds it: as is, or (the exporter's fused blocks)
    channels-last [N, pixels, C] with the pixels in a 2x2 pooling's phase order, all of them or the pooled ones only;
    None when neither matches."""
    from edge.exporter import _pooling_order

    if tuple(ref.shape) == tuple(shape):
        return ref
    if ref.ndim != 4:
        return None
    n, c, h, w = ref.shape
    pooled = 4 * (h // 2) * (w // 2)
    flat = ref.permute(0, 2, 3, 1).reshape(n, h * w, c)[:, _pooling_order(h, w)[0]]
    return {(n, h * w, c): flat, (n, pooled, c): flat[:, :pooled]}.get(tuple(shape))


def _relu_sign_flips(ort_inputs: list[np.ndarray], exact: list[torch.Tensor]) -> dict[str, Any]:
    """ReLU inputs whose sign (> 0 or not, as the ReLU's gradient mask sees it) differs between onnxruntime and
    float64: how many, and the smallest |float64 value| among them (None when there are none)."""
    exact = [_in_graph_layout(b, a.shape) for a, b in zip(ort_inputs, exact)]
    if len(ort_inputs) != len(exact) or any(b is None for b in exact):
        return {"count": None, "min_abs_float64": None}
    count, smallest = 0, None
    for a, b in zip(ort_inputs, exact):
        ref = b.numpy()
        flipped = (a > 0) != (ref > 0)
        count += int(flipped.sum())
        if flipped.any():
            m = float(np.abs(ref[flipped]).min())
            smallest = m if smallest is None else min(smallest, m)
    return {"count": count, "min_abs_float64": smallest}


def parity(model, bundle: Path, x_new, y_new, buf_x, buf_t, args, seed: int, lr: float) -> dict[str, Any]:
    """``parity_steps`` identical batches through the ONNX step and through PyTorch eager; max |param diff|."""
    import onnxruntime as ort

    manifest = edge.read_manifest(bundle)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    params, state = open_parameters(bundle, manifest, load_bundle_tensors(bundle))
    session = step_session(bundle, manifest, params, options)
    model = opened_model(model, params)  # PyTorch starts where the device starts: the dequantized weights
    opt = manifest["optimizer"]
    scalars = {"lr": np.array(lr, dtype=np.float32),
               **{k: np.array(opt[k], dtype=np.float32) for k in ("momentum", "weight_decay")}}
    names_out, trainable, mode = manifest["train_step_outputs"], manifest["trainable"], manifest["mode"]
    step_inputs = set(manifest["train_step_inputs"])
    net, torch_step = _torch_trainer(model, mode, lr, opt)
    references = {"no_onednn": _torch_trainer(model, mode, lr, opt, onednn=False),
                  "float64": _torch_trainer(model, mode, lr, opt, dtype=torch.float64)}
    one_step = one_step_torch_64 = one_step_ort_64 = one_step_torch_spread = one_step_tie_free = 0.0
    one_step_state_tie_free = state_abs_max = 0.0
    tie_steps = 0
    worst: dict[str, Any] = {}
    # Every ReLU input of the step graph as an extra output: which units each side's float32 forward puts on the
    # other side of zero than float64 does (a tie at float32 resolution moves that unit's whole gradient).
    probe, relu_inputs = _relu_probe(bundle, manifest, params, args.threads)
    for k, (x, t) in enumerate(_batches(x_new, y_new, buf_x, buf_t, args.parity_steps, seed)):
        feed = {PARAM_PREFIX + n: v for n, v in params.items() if PARAM_PREFIX + n in step_inputs}
        feed.update({STATE_PREFIX + n: v for n, v in state.items()})
        feed.update(x=x.numpy(), targets=t.numpy(), **_mean_weights(len(x)), **scalars)
        out = session.run(names_out, feed)
        # One step from PyTorch's current state: the graph's own error, without accumulated drift.
        net_params = {n: p.detach().clone() for n, p in net.named_parameters()}
        net_state = {n: (sgd_buf if (sgd_buf := _momentum(net, n)) is not None else torch.zeros_like(net_params[n]))
                     for n in trainable}
        feed1 = {PARAM_PREFIX + n: v.numpy() for n, v in net_params.items() if PARAM_PREFIX + n in step_inputs}
        feed1.update({STATE_PREFIX + n: v.numpy() for n, v in net_state.items()})
        feed1.update(x=x.numpy(), targets=t.numpy(), **_mean_weights(len(x)), **scalars)
        out1 = session.run(names_out, feed1)
        exact, exact_inputs = _float64_step(net, trainable, x, t, lr, opt)
        # PyTorch's own one-step spread: the same eager step from the same state with oneDNN on and off.
        eager = {}
        for onednn in (True, False):
            with torch.backends.mkldnn.flags(enabled=onednn):
                eager[onednn] = eager_step(model, net_params, net_state, x, t, lr, opt["momentum"], opt["weight_decay"],
                                           trainable)[1]
        one_step_torch_spread = max(one_step_torch_spread, _max_diff(eager[True], eager[False], trainable))
        for i, n in enumerate(trainable):
            params[n], state[n] = out[1 + i], out[1 + len(trainable) + i]
        torch_step(x, t)
        for _, ref_step in references.values():
            ref_step(x, t)
        after = dict(net.named_parameters())
        ort1 = dict(zip(trainable, out1[1:]))
        one_step_torch_64 = max(one_step_torch_64, _max_diff(after, exact, trainable))
        one_step_ort_64 = max(one_step_ort_64, _max_diff(ort1, exact, trainable))
        ort_flips = _relu_sign_flips(probe.run(relu_inputs, feed1), exact_inputs)
        torch_flips = _relu_sign_flips([v.numpy() for v in _relu_inputs_float32(model, net_params, x)], exact_inputs)
        if ort_flips["count"] == 0 and torch_flips["count"] == 0:
            one_step_tie_free = max(one_step_tie_free, _max_diff(ort1, after, trainable))
            # The momentum the graph hands to its next step, against torch.optim.SGD's buffer after the same step:
            # what carries a trajectory from one step to the next, checked without the steps' drift.
            ort_state1 = dict(zip(trainable, out1[1 + len(trainable):]))
            torch_state1 = {n: _momentum(net, n) for n in trainable}
            one_step_state_tie_free = max(one_step_state_tie_free, _max_diff(ort_state1, torch_state1, trainable))
            state_abs_max = max(state_abs_max, max(float(torch_state1[n].abs().max()) for n in trainable))
        else:
            tie_steps += 1
        for n in trainable:
            diff = _max_diff(ort1, after, [n])
            if diff > one_step:  # where the worst one-step difference sits, and which side carries it
                one_step = diff
                worst = {"param": n, "step": k, "ort_vs_torch": diff, "ort_vs_float64": _max_diff(ort1, exact, [n]),
                         "torch_vs_float64": _max_diff(after, exact, [n]),
                         "param_abs_max": float(exact[n].abs().max()),
                         "update_abs_max": float((exact[n] - net_params[n].double()).abs().max()),
                         "relu_sign_flips": ort_flips["count"], "relu_flip_min_abs_float64": ort_flips["min_abs_float64"],
                         "torch_relu_sign_flips": torch_flips["count"],
                         "torch_relu_flip_min_abs_float64": torch_flips["min_abs_float64"]}
    torch_params = dict(net.named_parameters())
    ref = {k: dict(r[0].named_parameters()) for k, r in references.items()}
    return {"lr": lr, "steps": args.parity_steps,
            "ort_vs_torch": _max_diff(params, torch_params, trainable),
            "per_param": {n: _max_diff(params, torch_params, [n]) for n in trainable},
            "one_step": one_step,
            "one_step_worst": worst,
            "one_step_ort_vs_float64": one_step_ort_64,
            "one_step_torch_vs_float64": one_step_torch_64,
            "one_step_torch_no_onednn": one_step_torch_spread,
            "one_step_tie_free": one_step_tie_free,
            "one_step_state_tie_free": one_step_state_tie_free,
            "state_abs_max_tie_free": state_abs_max,
            "tie_steps": tie_steps,
            "ort_vs_torch_no_onednn": _max_diff(params, ref["no_onednn"], trainable),
            "torch_vs_torch_no_onednn": _max_diff(torch_params, ref["no_onednn"], trainable),
            "ort_vs_float64": _max_diff(params, ref["float64"], trainable),
            "torch_vs_float64": _max_diff(torch_params, ref["float64"], trainable)}


def opened_model(model: torch.nn.Module, params: dict[str, np.ndarray]) -> torch.nn.Module:
    """A copy of ``model`` holding a bundle's opened (dequantized float32) parameters."""
    import copy

    opened = copy.deepcopy(model)
    opened.load_state_dict({n: torch.from_numpy(v.copy()) for n, v in params.items()}, strict=True)
    return opened.eval()


def frozen_constants_vs_fed(bundle: Path, x_new, y_new, buf_x, buf_t, args, seed: int) -> dict[str, float]:
    """Head mode: median ms of the step with the frozen weights as runtime-supplied constants (what the
    Retrainer does) vs the same graph with them as inputs fed on every step; interleaved, same batches."""
    import onnx
    import onnxruntime as ort

    manifest = edge.read_manifest(bundle)
    params, state = open_parameters(bundle, manifest, load_bundle_tensors(bundle))
    proto = onnx.load(str(bundle / TRAIN_STEP), load_external_data=False)
    frozen = [init for init in proto.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL]
    for init in frozen:
        proto.graph.input.append(onnx.helper.make_tensor_value_info(init.name, onnx.TensorProto.FLOAT, list(init.dims)))
        proto.graph.initializer.remove(init)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    constants = step_session(bundle, manifest, params, options)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    fed = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    scalars = {k: np.array(manifest["optimizer"][k], dtype=np.float32) for k in ("lr", "momentum", "weight_decay")}
    names_out = manifest["train_step_outputs"]
    times: dict[str, list[float]] = {"constants": [], "fed": []}
    for k, (x, t) in enumerate(_batches(x_new, y_new, buf_x, buf_t, args.latency_steps + 5, seed + 2)):
        feed = {PARAM_PREFIX + n: params[n] for n in manifest["params"] if PARAM_PREFIX + n in manifest["train_step_inputs"]}
        feed.update({STATE_PREFIX + n: v for n, v in state.items()}, x=x.numpy(), targets=t.numpy(), **_mean_weights(len(x)), **scalars)
        for name, session, extra in (("constants", constants, {}),
                                     ("fed", fed, {init.name: params[init.name[len(PARAM_PREFIX):]] for init in frozen})):
            started = time.perf_counter()
            session.run(names_out, {**feed, **extra})
            if k >= 5:
                times[name].append(time.perf_counter() - started)
    return {f"step_ms_{name}": 1000 * statistics.median(v) for name, v in times.items()}


def torch_latency(model, mode: str, x_new, y_new, buf_x, buf_t, args, seed: int) -> float:
    """Median ms of the PyTorch eager step at the same batch shapes (warm-up excluded)."""
    net, torch_step = _torch_trainer(model, mode, 0.01, {"momentum": 0.9, "weight_decay": 0.0})
    times = []
    for k, (x, t) in enumerate(_batches(x_new, y_new, buf_x, buf_t, args.latency_steps + 5, seed + 1)):
        started = time.perf_counter()
        torch_step(x, t)
        if k >= 5:
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def run_device(bundle: Path, files: dict[str, str], args, seed: int, epochs: int, replays: list[int],
               memory_limit_mb: float | None, score: bool = True) -> dict[str, Any]:
    """Retrain in a fresh process where torch cannot be imported: accuracy (``score``), step latency, peak RSS."""
    job = dict(bundle=str(bundle), seed=seed, threads=args.threads, epochs=epochs, replays=replays, warmup=3,
               memory_limit_mb=memory_limit_mb, score=score, **files)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, json.dumps(job)], capture_output=True, text=True, env=env,
                          timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"device process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_seed(seed: int, args, out: Path) -> dict[str, Any]:
    from replaykit.distill import make

    torch.set_num_threads(args.threads)
    s = _settings(args.quick)
    info = dataset_info("mnist")
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = load_tensors("mnist", train=True, root=args.data_root, normalized=False)
    x_test, y_test = load_tensors("mnist", train=False, root=args.data_root, normalized=False)
    # Everything goes through uint8 pixels, exactly as a device would receive it.
    norm = lambda px: _normalise_uint8(_to_uint8(px), info)  # noqa: E731
    base_x, base_y = _take(x_train, y_train, OLD, s["base_train"] // len(OLD), gen)
    pool_x, pool_y = _take(x_train, y_train, OLD, s["distill_pool"] // len(OLD), gen)
    new_x, new_y = _take(x_train, y_train, NEW, s["new_per_class"], gen)
    old_tx, old_ty = _take(x_test, y_test, OLD, s["test_per_class"], gen)
    new_tx, new_ty = _take(x_test, y_test, NEW, s["test_per_class"], gen)

    t0 = time.perf_counter()
    with seeded(seed):
        model = ConvNet(info.in_shape, 10, width=args.width, depth=args.depth).to(resolve_device(args.device))
    train_classifier(model, norm(base_x), base_y, epochs=s["base_epochs"], batch_size=128, lr=0.01, seed=seed)
    model = model.cpu().eval()  # the edge comparison runs on the CPU
    base_seconds = time.perf_counter() - t0

    ipc = -(-args.buffer_size // len(OLD))
    distiller = make(args.buffer_method, ipc=ipc, seed=seed, progress=False, device=args.device)
    buffer = distiller.distill(norm(pool_x), pool_y, num_classes=10, meta=info.meta())
    keep = torch.cat([buffer.indices_of(c)[: ipc - (1 if k >= len(OLD) - (ipc * len(OLD) - args.buffer_size) else 0)]
                      for k, c in enumerate(OLD)])
    buffer = buffer.subset(keep)

    data_dir = out / f"seed{seed}"
    files = {}
    path = data_dir / "new.npz"
    atomic_write(path, lambda tmp: np.savez(open(tmp, "wb"), x=_to_uint8(new_x), y=new_y.numpy()))
    files["new"] = str(path)
    for name, (x, y) in {"old_test": (old_tx, old_ty), "new_test": (new_tx, new_ty)}.items():  # .npy: streamed in chunks
        for part, value in (("x", _to_uint8(x)), ("y", y.numpy())):
            atomic_write(data_dir / f"{name}_{part}.npy", lambda tmp, value=value: np.save(open(tmp, "wb"), value))
        files[name] = str(data_dir / name)
    x_new_t = _normalise_uint8(np.load(files["new"])["x"], info)
    buf_x = (torch.from_numpy(_to_uint8(buffer.pixels())).float() / 255.0 - torch.tensor(info.mean).view(1, -1, 1, 1)) / torch.tensor(info.std).view(1, -1, 1, 1)
    buf_t = buffer.soft_targets().float()
    buf_t = torch.nn.functional.pad(buf_t, (0, 10 - buf_t.shape[1]))

    with torch.no_grad():
        base_old = float((model(norm(old_tx)).argmax(1) == old_ty).float().mean())
    result: dict[str, Any] = {"seed": seed, "base_train_seconds": base_seconds, "base_old_acc": base_old,
                              "buffer_images": len(buffer), "buffer_counts": buffer.counts(), "runs": {}}
    if args.buffers:
        # The host distils each experience from all of its data (quick: the small distillation pool).
        host_x, host_y = (pool_x, pool_y) if args.quick else _take(x_train, y_train, OLD, None, gen)
        result["buffer_rows"] = buffer_rows(model, buffer, norm(host_x), host_y, files, args, seed, data_dir, s["device_epochs"])
    if args.only_buffers:
        return result
    for weights in args.weights:
        for mode in ("head", "full"):
            bundle = data_dir / f"bundle_{weights}_{mode}"
            started = time.perf_counter()
            edge.export(model, buffer, bundle, mode=mode, storage="uint8", weights=weights, lr=0.01, momentum=0.9,
                        overwrite=True, seed=seed)
            export_seconds = time.perf_counter() - started
            # Parity at every lr for the reference storage; at the bundle's lr for the others (same graphs).
            lrs = args.parity_lrs if weights == args.weights[0] else args.parity_lrs[:1]
            row: dict[str, Any] = {"parity": [parity(model, bundle, x_new_t, new_y, buf_x, buf_t, args, seed, lr)
                                              for lr in lrs]}
            row["parity_max_abs_diff"] = row["parity"][0]["ort_vs_torch"]
            row["device"] = run_device(bundle, files, args, seed, s["device_epochs"], [32, 0], args.memory_limit_mb)
            # Latency as a device would run it with no cap (PyTorch has none either); own process, own peak;
            # as many timed steps as PyTorch's (the device's epochs x 32 steps, less 3 warm-up). PyTorch's step is
            # timed just before it, so the two sides of a ratio are measured side by side on a shared 2-core machine
            # whose speed varies over a run (a process may also run in a ~2x slower state of its own: JOURNAL.md).
            row["torch_step_ms_median"] = torch_latency(model, mode, x_new_t, new_y, buf_x, buf_t, args, seed)
            row["device_uncapped"] = run_device(bundle, files, args, seed, s["device_epochs"], [32], None, score=False)
            row["ort_step_ms_median"] = row["device_uncapped"]["with_buffer"]["step_ms_median"]
            row["ort_step_ms_median_capped"] = row["device"]["with_buffer"]["step_ms_median"]
            row["latency_ratio_ort_over_torch"] = row["ort_step_ms_median"] / row["torch_step_ms_median"]
            if mode == "head" and weights == args.weights[0]:
                row["frozen_weights"] = frozen_constants_vs_fed(bundle, x_new_t, new_y, buf_x, buf_t, args, seed)
            row["bundle_bytes"] = _bundle_bytes(bundle)
            row["export_seconds"] = export_seconds
            result["runs"].setdefault(weights, {})[mode] = row
            print(f"seed {seed} {weights} {mode}: parity {row['parity_max_abs_diff']:.2e} (one step "
                  f"{row['parity'][0]['one_step']:.1e} at {row['parity'][0]['one_step_worst'].get('param')}; PyTorch one step vs "
                  f"float64 {row['parity'][0]['one_step_torch_vs_float64']:.1e}), ORT {row['ort_step_ms_median']:.2f} ms vs "
                  f"torch {row['torch_step_ms_median']:.2f} ms, peak RSS {row['device']['peak_rss_mb']:.1f} MB, "
                  f"bundle {row['bundle_bytes']['total'] / 1024:.1f} KB, opened old acc {row['device']['opened_old_acc']:.4f}, "
                  f"old acc with/without buffer {row['device']['with_buffer']['old_acc']:.3f}/"
                  f"{row['device']['without_buffer']['old_acc']:.3f}", flush=True)
    if args.wide_width:
        result["wide"] = wide_run(args.wide_width, args, out, seed, norm(base_x), base_y, buffer, old_tx, old_ty)
    return result


def host_headline_buffer(model: torch.nn.Module, pool_x: torch.Tensor, pool_y: torch.Tensor, args, seed: int):
    """The host's headline buffer of the old classes: a ``DistilledReplayPlugin`` as ``class_incremental.py``'s
    first DISTILLED row builds it (dm, JPEG q2, held logits, recompress=select, mix 0.5, 78,500 B), its buffer
    updated experience by experience (classes 0-1, 2-3, 4-5, 6-7) with ``model`` as the learner whose logits it
    holds (the model trained on all old classes: the learner a device starts from)."""
    from replaykit.avalanche import DistilledReplayPlugin

    info = dataset_info("mnist")
    plugin = DistilledReplayPlugin(
        mem_bytes=HEADLINE_BYTES, method="dm", method_options={"iterations": args.buffer_iterations}, storage="jpeg",
        jpeg_quality=2, recompress="select", logits=True, mix=0.5, dataset_meta=info.meta(), num_classes=10,
        seed=seed, progress=False,
    )
    for first in range(0, len(OLD), 2):
        keep = (pool_y == OLD[first]) | (pool_y == OLD[first + 1])
        plugin.storage_policy.update_from_tensors(pool_x[keep], pool_y[keep], learner=model)
    return plugin


def buffer_rows(model, uint8_buffer, pool_x, pool_y, files: dict[str, str], args, seed: int, data_dir: Path,
                epochs: int) -> list[dict[str, Any]]:
    """PROTOCOL C with each replay buffer of ``args.buffers`` at the headline bytes: export a full-mode int8
    bundle of ``model`` with it, learn classes 8-9 on the device (torch blocked, memory cap), score old / new classes."""
    rows = []
    for kind in args.buffers:
        started = time.perf_counter()
        if kind == "host-headline":
            host = host_headline_buffer(model, pool_x, pool_y, args, seed)
            held, host_bytes, images = host, host.storage_policy.nbytes(), len(host.buffer)
        else:
            held, host_bytes, images = uint8_buffer, uint8_buffer.nbytes("uint8"), len(uint8_buffer)
        build_seconds = time.perf_counter() - started
        bundle = edge.export(model, held, data_dir / f"bundle_buffer_{kind}", mode="full", weights="int8", lr=0.01,
                             momentum=0.9, overwrite=True, seed=seed)
        manifest = edge.read_manifest(bundle)
        device = run_device(bundle, files, args, seed, epochs, [32], args.memory_limit_mb)
        row = {"buffer": kind, "seed": seed, "buffer_images": images, "host_buffer_bytes": host_bytes,
               "buffer_file_bytes": (bundle / "replay.safetensors").stat().st_size,
               "bundle_bytes": _bundle_bytes(bundle)["total"], "image_storage": manifest["image_storage"],
               "held_logits": manifest["replay"]["held_logits"], "mix": manifest["replay"]["mix"],
               "logit_loss_weight": manifest["replay"]["logit_loss_weight"],
               "old_class_accuracy": device["with_buffer"]["old_acc"], "new_class_accuracy": device["with_buffer"]["new_acc"],
               "opened_old_accuracy": device["opened_old_acc"], "peak_rss_mb": device["peak_rss_mb"],
               "cap_mb": args.memory_limit_mb, "torch_loaded": device["torch_loaded"],
               "device_step_ms_median": device["with_buffer"]["step_ms_median"], "steps": device["with_buffer"]["steps"],
               "build_seconds": build_seconds}
        rows.append(row)
        print(f"seed {seed} buffer {kind}: {images} images, host {host_bytes} B, replay file {row['buffer_file_bytes']} B, "
              f"old acc {row['old_class_accuracy']:.4f}, new acc {row['new_class_accuracy']:.4f}, "
              f"peak RSS {row['peak_rss_mb']:.1f} MB (cap {args.memory_limit_mb:g})", flush=True)
    return rows


def buffer_table(results: list[dict]) -> tuple[list[dict], str]:
    """Every buffer row, and a table of old / new accuracy per buffer (mean ± std over seeds)."""
    rows = [row for r in results for row in r.get("buffer_rows", [])]
    lines = ["| buffer | seeds | images | replay file bytes | old-class acc | new-class acc | peak RSS MB (cap) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for kind in BUFFER_KINDS:
        mine = [row for row in rows if row["buffer"] == kind]
        if not mine:
            continue
        old, new = _stat([row["old_class_accuracy"] for row in mine]), _stat([row["new_class_accuracy"] for row in mine])
        lines.append(f"| {kind} | {len(mine)} | {max(row['buffer_images'] for row in mine)} | "
                     f"{max(row['buffer_file_bytes'] for row in mine)} | {_fmt(old, 4)} | {_fmt(new, 4)} | "
                     f"{max(row['peak_rss_mb'] for row in mine):.1f} ({mine[0]['cap_mb']:g}) |")
    return rows, "\n".join(lines) + "\n"


def wide_run(width: int, args, out: Path, seed: int, base_x, base_y, buffer, old_tx, old_ty) -> dict[str, Any]:
    """A ConvNet of ``width`` trained on the same data: per weight storage, bundle bytes (head, full; the
    same 100-image uint8 buffer) and the opened model's accuracy on the old classes (device runtime)."""
    info = dataset_info("mnist")
    started = time.perf_counter()
    with seeded(seed):
        model = ConvNet(info.in_shape, 10, width=width, depth=args.depth).to(resolve_device(args.device))
    train_classifier(model, base_x, base_y, epochs=args.wide_epochs, batch_size=128, lr=0.01, seed=seed)
    model = model.cpu().eval()
    x_old = _to_uint8(old_tx)
    with torch.no_grad():
        torch_acc = float((model(_normalise_uint8(x_old, info)).argmax(1) == old_ty).float().mean())
    row: dict[str, Any] = {"width": width, "params": sum(p.numel() for p in model.parameters()),
                           "train_seconds": time.perf_counter() - started, "torch_old_acc": torch_acc, "storages": {}}
    for weights in args.weights:
        entry: dict[str, Any] = {}
        for mode in ("head", "full"):
            bundle = edge.export(model, buffer, out / f"seed{seed}" / f"wide_w{width}_{weights}_{mode}", mode=mode,
                                 weights=weights, overwrite=True, seed=seed)
            entry[f"{mode}_bytes"] = _bundle_bytes(bundle)["total"]
        # Head and full bundles open to the same model: score one of them.
        entry["opened_old_acc"] = edge.Retrainer(bundle, threads=args.threads).evaluate(x_old, old_ty.numpy(), batch_size=256)
        row["storages"][weights] = entry
        print(f"seed {seed} width {width} {weights}: head {entry['head_bytes'] / 1024:.1f} KB, full "
              f"{entry['full_bytes'] / 1024:.1f} KB, opened old acc {entry['opened_old_acc']:.4f}", flush=True)
    return row


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


PARITY_COLUMNS = [
    ("ort_vs_torch", "ORT vs PyTorch eager"),
    ("one_step", "worst one-step ORT vs PyTorch"),
    ("one_step_ort_vs_float64", "one-step ORT vs float64"),
    ("one_step_torch_vs_float64", "PyTorch one step vs float64"),
    ("one_step_torch_no_onednn", "PyTorch one-step spread (oneDNN on vs off)"),
    ("tie_steps", "steps where a ReLU sign differs from float64 (either side)"),
    ("one_step_tie_free", "worst one-step ORT vs PyTorch on the other steps"),
    ("one_step_state_tie_free", "worst one-step momentum ORT vs PyTorch on the other steps"),
    ("torch_vs_torch_no_onednn", "PyTorch vs PyTorch without oneDNN"),
    ("ort_vs_torch_no_onednn", "ORT vs PyTorch without oneDNN"),
    ("ort_vs_float64", "ORT vs float64 PyTorch"),
    ("torch_vs_float64", "PyTorch vs float64 PyTorch"),
]


def _or_dash(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _stat(values: list[float]) -> dict[str, Any]:
    mean, std = _mean_std(values)
    return {"mean": mean, "std": std, "values": values}


def _fmt(stat: dict[str, Any], digits: int = 2) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def summarise(results: list[dict], args) -> tuple[dict, str]:
    summary: dict[str, Any] = {"runs": {}}
    lines = [
        f"Edge retraining, MNIST ConvNet-{args.depth} width {args.width}, {args.buffer_size}-image {args.buffer_method} buffer "
        f"(uint8), weight storages {args.weights}, seeds {args.seeds}, {args.threads} threads, device memory cap "
        f"{args.memory_limit_mb:g} MB{' (QUICK smoke run)' if args.quick else ''}; PyTorch process "
        f"{'keeps freed memory (glibc mallopt)' if args.keep_freed_memory else 'at glibc malloc defaults'}, device processes "
        "at glibc defaults",
        "",
        f"Parity: max abs parameter difference after {args.parity_steps} steps of 32 new + 32 buffer samples "
        "(SGD momentum 0.9; PyTorch starts from the weights as the device opens them), worst over seeds",
        "",
        "| weights | mode | lr | " + " | ".join(title for _, title in PARITY_COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(PARITY_COLUMNS),
    ]
    for weights in args.weights:
        for mode in ("head", "full"):
            for k, run0 in enumerate(results[0]["runs"][weights][mode]["parity"]):
                runs = [r["runs"][weights][mode]["parity"][k] for r in results]
                worst = {key: max(run[key] for run in runs) for key, _ in PARITY_COLUMNS}
                summary["runs"].setdefault(weights, {}).setdefault(mode, {})[f"parity_lr{run0['lr']:g}"] = worst
                lines.append(f"| {weights} | {mode} | {run0['lr']:g} | " + " | ".join(format(worst[key], "d" if key == "tie_steps" else ".1e") for key, _ in PARITY_COLUMNS) + " |")
    lines += ["", "Where the worst one-step ORT vs PyTorch difference sits (worst seed, first lr): the parameter, the step, each "
                  "side against the float64 step from the same state, the size of that parameter and of its update, and the ReLU "
                  "inputs at that step whose sign differs between each side's float32 forward and float64 (count; smallest "
                  "|float64 value| among them, '-' when none)", "",
              "| weights | mode | seed | parameter | step | ORT vs PyTorch | ORT vs float64 | PyTorch vs float64 | max abs param | "
              "max abs update | ReLU signs ORT vs float64 differ | smallest abs float64 pre-activation among them | "
              "ReLU signs PyTorch vs float64 differ | smallest abs float64 pre-activation among them |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for weights in args.weights:
        for mode in ("head", "full"):
            seed_worst = max(results, key=lambda r: r["runs"][weights][mode]["parity"][0]["one_step"])
            w = seed_worst["runs"][weights][mode]["parity"][0]["one_step_worst"]
            if w:
                lines.append(f"| {weights} | {mode} | {seed_worst['seed']} | {w['param']} | {w['step']} | {w['ort_vs_torch']:.1e} | "
                             f"{w['ort_vs_float64']:.1e} | {w['torch_vs_float64']:.1e} | {w['param_abs_max']:.3g} | "
                             f"{w['update_abs_max']:.2e} | {_or_dash(w.get('relu_sign_flips'), 'd')} | "
                             f"{_or_dash(w.get('relu_flip_min_abs_float64'), '.1e')} | "
                             f"{_or_dash(w.get('torch_relu_sign_flips'), 'd')} | "
                             f"{_or_dash(w.get('torch_relu_flip_min_abs_float64'), '.1e')} |")
    lines += ["", "| weights | mode | ORT step ms | PyTorch step ms | ratio ORT/PyTorch | ORT step ms under the cap (micro-batch) | "
                  "device peak RSS MB under the cap | bundle KB | opened model, old acc | "
                  "old acc with buffer | old acc without | new acc with buffer | new acc without |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for weights in args.weights:
        for mode in ("head", "full"):
            rows = [r["runs"][weights][mode] for r in results]
            stats = {
                "ort_ms": [r["ort_step_ms_median"] for r in rows],
                "torch_ms": [r["torch_step_ms_median"] for r in rows],
                "ratio": [r["latency_ratio_ort_over_torch"] for r in rows],
                "ort_ms_capped": [r["ort_step_ms_median_capped"] for r in rows],
                "rss": [r["device"]["peak_rss_mb"] for r in rows],
                "kb": [r["bundle_bytes"]["total"] / 1024 for r in rows],
                "opened_old": [r["device"]["opened_old_acc"] for r in rows],
                "old_with": [r["device"]["with_buffer"]["old_acc"] for r in rows],
                "old_without": [r["device"]["without_buffer"]["old_acc"] for r in rows],
                "new_with": [r["device"]["with_buffer"]["new_acc"] for r in rows],
                "new_without": [r["device"]["without_buffer"]["new_acc"] for r in rows],
            }
            cell = summary["runs"][weights][mode]
            cell.update({k: _stat(v) for k, v in stats.items()})
            micro = sorted({r["device"]["with_buffer"]["micro_batch"] for r in rows})
            lines.append(
                f"| {weights} | {mode} | {_fmt(cell['ort_ms'])} | {_fmt(cell['torch_ms'])} | {_fmt(cell['ratio'])} | "
                f"{_fmt(cell['ort_ms_capped'])} ({'/'.join(map(str, micro))}) | {_fmt(cell['rss'], 1)} | {_fmt(cell['kb'], 1)} | "
                + " | ".join(_fmt(cell[k], 4 if k == "opened_old" else 3)
                             for k in ("opened_old", "old_with", "old_without", "new_with", "new_without")) + " |")
    reference = args.weights[0]
    fed = [r["runs"][reference]["head"]["frozen_weights"] for r in results]
    summary["head_frozen_weights"] = {k: _stat([f[k] for f in fed]) for k in fed[0]}
    base = [r["base_old_acc"] for r in results]
    summary["base_old_acc"] = _stat(base)
    lines += ["", f"Base model (PyTorch, float32) accuracy on old classes before the device learns 8-9: {_fmt(summary['base_old_acc'], 4)}",
              f"Head-mode step ({reference} bundle, in-process onnxruntime, same batches, interleaved): frozen weights as "
              f"runtime-supplied constants {_fmt(summary['head_frozen_weights']['step_ms_constants'])} ms vs fed as inputs "
              f"{_fmt(summary['head_frozen_weights']['step_ms_fed'])} ms"]
    if "wide" in results[0]:
        wide = [r["wide"] for r in results]
        width = wide[0]["width"]
        lines += ["", f"Bundle KB per weight storage (100-image uint8 buffer) at width {args.width} (trained model above) and "
                      f"width {width} ({wide[0]['params']} params, trained {args.wide_epochs} epoch(s) on the same data); "
                      f"opened width-{width} model's accuracy on old classes (device runtime) and its drop against the "
                      f"{reference} bundle, in points (PyTorch float32: {_fmt(_stat([w['torch_old_acc'] for w in wide]), 4)})",
                  "",
                  f"| weights | head KB w{args.width} | full KB w{args.width} | head KB w{width} | full KB w{width} | "
                  f"opened old acc w{width} | drop vs {reference} (points) |",
                  "|---|---|---|---|---|---|---|"]
        summary["wide"] = {}
        for weights in args.weights:
            stats = {
                "head_kb_narrow": _stat([r["runs"][weights]["head"]["bundle_bytes"]["total"] / 1024 for r in results]),
                "full_kb_narrow": _stat([r["runs"][weights]["full"]["bundle_bytes"]["total"] / 1024 for r in results]),
                "head_kb": _stat([w["storages"][weights]["head_bytes"] / 1024 for w in wide]),
                "full_kb": _stat([w["storages"][weights]["full_bytes"] / 1024 for w in wide]),
                "opened_old_acc": _stat([w["storages"][weights]["opened_old_acc"] for w in wide]),
                "drop_points": _stat([100 * (w["storages"][reference]["opened_old_acc"] - w["storages"][weights]["opened_old_acc"])
                                      for w in wide]),
            }
            summary["wide"][weights] = stats
            lines.append(f"| {weights} | {_fmt(stats['head_kb_narrow'], 1)} | {_fmt(stats['full_kb_narrow'], 1)} | "
                         f"{_fmt(stats['head_kb'], 1)} | {_fmt(stats['full_kb'], 1)} | {_fmt(stats['opened_old_acc'], 4)} | "
                         f"{_fmt(stats['drop_points'], 2)} |")
    return summary, "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, weights: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5), sharey=True)
    labels = ["opened", "old, with buffer", "old, without", "new, with buffer", "new, without"]
    keys = ["opened_old", "old_with", "old_without", "new_with", "new_without"]
    bar = 0.8 / len(weights)
    for ax, mode in zip(axes, ("head", "full")):
        for k, storage in enumerate(weights):
            cell = summary["runs"][storage][mode]
            ax.bar(np.arange(len(keys)) + (k - (len(weights) - 1) / 2) * bar, [cell[key]["mean"] for key in keys], bar,
                   yerr=[cell[key]["std"] for key in keys], label=f"{storage} weights", capsize=2)
        ax.set_xticks(np.arange(len(keys)), labels, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{mode} mode")
    axes[0].set_ylabel("test accuracy")
    axes[1].legend(fontsize=8)
    fig.suptitle("Device learns MNIST 8-9: old classes 0-7 with vs without replay, per weight storage")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_before = os.getloadavg()
    keeps_freed_memory = False
    if args.keep_freed_memory:  # the PyTorch reference at its fastest; device processes are fresh and never call it
        from replaykit.runtime import keep_freed_memory

        keeps_freed_memory = keep_freed_memory()
    results = []
    for seed in args.seeds:
        results.append(run_seed(seed, args, out))
        atomic_write_json(out / "results_partial.json", {"args": vars(args), "results": results})
    rows, rows_table = buffer_table(results)
    if args.only_buffers:
        summary, table = {}, ""
    else:
        summary, table = summarise(results, args)
    if rows:
        table += "\nReplay buffers at the headline bytes on the device (full mode, int8 weights, learns 8-9):\n\n" + rows_table
    payload = {"args": vars(args), "settings": _settings(args.quick), "results": results, "buffer_rows": rows,
               "summary": summary, "seconds": time.time() - started,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "load_average_before_after": [list(load_before), list(os.getloadavg())],
               "machine_note": f"{os.cpu_count()}-CPU machine, no GPU",
               "torch_process_keeps_freed_memory": keeps_freed_memory}
    atomic_write_json(out / "results.json", payload)
    atomic_write_bytes(out / "results.md", table.encode())
    if summary:
        plot(summary, out / "forgetting.png", args.weights)
    if args.copy_json:
        merge_buffer_rows(Path(args.copy_json), rows, payload)
    print(table)
    print(f"wrote {out}/results.json, results.md, forgetting.png in {payload['seconds']:.0f} s")
    return 0


def merge_buffer_rows(path: Path, rows: list[dict], payload: dict) -> None:
    """Put ``rows`` into the results document at ``path`` (its other contents kept), replacing rows of the same
    buffer and seed; the run's date, load and arguments go beside them."""
    document = json.loads(path.read_text()) if path.is_file() else {}
    fresh = {(row["buffer"], row["seed"]) for row in rows}
    kept = [row for row in document.get("buffer_rows", []) if (row["buffer"], row["seed"]) not in fresh]
    document["buffer_rows"] = kept + rows
    document["buffer_rows_run"] = {k: payload[k] for k in ("args", "date", "load_average_before_after", "seconds", "machine_note")}
    atomic_write_json(path, document)


if __name__ == "__main__":
    sys.exit(main())
