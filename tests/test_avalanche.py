"""The distilled-replay plugin inside real Avalanche strategies on the digits stream."""

from __future__ import annotations

import types

import pytest
import torch

from replaykit import distill
from replaykit.avalanche import BufferConfig, DistilledBuffer, DistilledReplayPlugin, class_quotas
from replaykit.buffer import SyntheticBuffer
from replaykit.continual import RunConfig, StrategySpec, make_strategy, make_stream, run
from replaykit.data import dataset_info, load_tensors
from replaykit.networks import ConvNet
from replaykit.training import accuracy, seeded, train_classifier

DIGITS = dataset_info("digits").meta()
# depth 2: the 8x8 digits are pooled to 2x2, where instance norm still has something to normalise
CONFIG = RunConfig(dataset="digits", epochs=10, width=16, depth=2, batch_size=32, batch_size_mem=32, seed=0)


@pytest.fixture(scope="module")
def stream():
    torch.set_num_threads(2)
    return make_stream(CONFIG)


@pytest.fixture(scope="module")
def digits():
    return load_tensors("digits")


def _fake_exp(images: torch.Tensor, labels: torch.Tensor):
    """What ``post_adapt`` reads from an experience: its dataset of (x, y, task) items."""
    from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_classification_dataset

    from replaykit.avalanche import _LabelledImages

    return types.SimpleNamespace(dataset=_make_taskaware_classification_dataset(_LabelledImages(images, labels), task_labels=0))


# ----------------------------------------------------------------- in a strategy
def _record_loss_terms(plugin) -> list[float]:
    """Wrap ``plugin.before_backward``: the list it returns gets what each call added to the strategy's loss."""
    added: list[float] = []
    original = plugin.before_backward

    def spy(strategy, **kwargs):
        before = float(strategy.loss)
        original(strategy, **kwargs)
        added.append(float(strategy.loss) - before)

    plugin.before_backward = spy
    return added


def test_buffer_stays_within_budget_and_holds_every_seen_class(stream):
    from avalanche.logging import BaseLogger

    class Capture(BaseLogger):
        def __init__(self):
            super().__init__()
            self.logged: dict[str, float] = {}

        def log_single_metric(self, name, value, x_plot):
            self.logged[name] = value

    plugin = DistilledReplayPlugin(mem_size=20, method="random", dataset_meta=DIGITS, progress=False, batch_size_mem=32)
    strategy = make_strategy(StrategySpec("naive"), CONFIG)
    strategy.plugins.append(plugin)
    logger = Capture()
    strategy.evaluator.loggers.append(logger)
    seen: set[int] = set()
    for exp in stream.train_stream:
        strategy.train(exp)
        seen |= set(int(c) for c in exp.classes_in_this_experience)
        assert len(plugin.buffer) <= 20
        assert set(plugin.buffer.classes) == seen
        assert len(plugin.storage_policy.buffer) == len(plugin.buffer)  # the Avalanche view agrees
    assert plugin.buffer.counts() == {c: 2 for c in range(10)}
    metrics = strategy.evaluator.get_all_metrics()
    names = [f"DistillSeconds/train_phase/train_stream/Exp{i:03d}" for i in range(5)]
    assert all(name in metrics for name in names), sorted(metrics)
    assert all(metrics[name][1][0] >= 0 for name in names)
    assert set(names) <= set(logger.logged)  # Avalanche loggers receive them too
    assert plugin.buffer.meta["dataset"] == "digits" and plugin.buffer.meta["method"] == "random"


def test_distilled_replay_forgets_less_than_naive(stream):
    naive = run(StrategySpec("naive"), CONFIG, stream)
    distilled = run(StrategySpec("distilled", 20, "random"), CONFIG, stream)
    # measured on seed 0: naive forgets ~1.0 and ends near 0.2; distilled replay forgets ~0.35
    assert naive.forgetting > 0.9
    assert distilled.forgetting < naive.forgetting - 0.4
    assert distilled.final_accuracy > naive.final_accuracy + 0.3
    assert distilled.memory_images == 20


def test_works_as_storage_policy_of_avalanche_replay_plugin(stream):
    from avalanche.training.plugins import ReplayPlugin

    policy = DistilledBuffer(10, method="random", dataset_meta=DIGITS, progress=False)
    strategy = make_strategy(StrategySpec("naive"), CONFIG)
    strategy.plugins.append(ReplayPlugin(mem_size=10, storage_policy=policy))
    for exp in stream.train_stream[:3]:
        strategy.train(exp)
    assert policy.synthetic.counts() == {c: (2 if c < 4 else 1) for c in range(6)}


def test_checkpoint_save_and_restore_gives_the_same_buffer(stream, tmp_path):
    from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint

    spec = StrategySpec("distilled", 20, "random")
    strategy = make_strategy(spec, CONFIG)
    for exp in stream.train_stream[:2]:
        strategy.train(exp)
    path = tmp_path / "ckpt.pkl"
    # torch 2.14's SGD cannot be pickled by dill; Avalanche rebuilds the optimizer's state each experience anyway
    save_checkpoint(strategy, str(path), exclude=["optimizer"])
    restored, next_exp = maybe_load_checkpoint(make_strategy(spec, CONFIG), str(path))
    assert next_exp == 2
    before, after = strategy.plugins[0].buffer, restored.plugins[0].buffer
    assert torch.equal(before.images, after.images) and torch.equal(before.labels, after.labels)
    assert before.meta == after.meta
    restored.train(stream.train_stream[2])  # training goes on from the restored buffer
    assert restored.plugins[0].buffer.classes == [0, 1, 2, 3, 4, 5]

    # and on its own, in the safetensors buffer format
    file = strategy.plugins[0].storage_policy.save(tmp_path / "buffer.safetensors")
    fresh = DistilledBuffer(20, method="random", dataset_meta=DIGITS, progress=False)
    loaded = fresh.load(file)
    assert torch.equal(loaded.images, before.images) and len(fresh.buffer) == 20


def test_soft_label_buffer_is_replayed_with_a_soft_loss(stream, digits):
    x, y = digits
    old = (y < 2).nonzero().flatten()[:20]
    probs = torch.full((20, 10), 0.02)
    probs[torch.arange(20), y[old]] = 0.82
    soft = SyntheticBuffer(x[old].clone(), probs, 10, y[old].clone(), dict(DIGITS))
    xt, yt = load_tensors("digits", train=False)
    old_test = yt < 2
    scores = {}
    for with_buffer in (False, True):
        plugin = DistilledReplayPlugin(mem_size=20, method="random", dataset_meta=DIGITS, progress=False, seed=0)
        if with_buffer:
            plugin.storage_policy.set_synthetic(soft)
        strategy = make_strategy(StrategySpec("naive"), CONFIG)
        strategy.plugins.append(plugin)
        strategy.train(stream.train_stream[1])  # classes 2 and 3 only
        scores[with_buffer] = accuracy(strategy.model, xt[old_test], yt[old_test])
        if with_buffer:
            assert plugin.buffer.is_soft and plugin.buffer.classes == [0, 1, 2, 3]
    assert scores[False] < 0.05  # without replay classes 0/1 are never predicted
    assert scores[True] > 0.6  # the soft-label buffer keeps them (measured 0.79 on seed 0)


def test_budget_smaller_than_classes_seen_is_refused_before_training(stream):
    plugin = DistilledReplayPlugin(mem_size=3, method="random", dataset_meta=DIGITS, progress=False)
    strategy = make_strategy(StrategySpec("naive"), CONFIG)
    strategy.plugins.append(plugin)
    strategy.train(stream.train_stream[0])
    weights = strategy.model.classifier.weight.detach().clone()
    with pytest.raises(ValueError, match="budget of 3 images is smaller than the 4 classes"):
        strategy.train(stream.train_stream[1])
    assert torch.equal(weights, strategy.model.classifier.weight)  # refused before any step
    assert plugin.buffer.counts() == {0: 2, 1: 1}  # the buffer is untouched


# --------------------------------------------------------------- edge cases
def test_class_with_fewer_images_than_its_quota_keeps_all_of_them(digits):
    x, y = digits
    idx = torch.cat([(y == 0).nonzero().flatten()[:3], (y == 1).nonzero().flatten()[:40]])
    policy = DistilledBuffer(20, method="random", dataset_meta=DIGITS, progress=False)
    policy.post_adapt(None, _fake_exp(x[idx], y[idx]))
    assert policy.synthetic.counts() == {0: 3, 1: 10}
    kept = policy.synthetic.images[policy.synthetic.indices_of(0)]
    assert torch.equal(kept.sort(0).values, x[idx[:3]].sort(0).values)


def test_single_class_experience(digits):
    x, y = digits
    policy = DistilledBuffer(12, method="random", dataset_meta=DIGITS, progress=False)
    only5 = y == 5
    policy.update_from_tensors(x[only5], y[only5])
    assert policy.synthetic.counts() == {5: 12}
    only7 = y == 7
    policy.update_from_tensors(x[only7], y[only7])
    assert policy.synthetic.counts() == {5: 6, 7: 6}
    assert len(policy.distill_seconds) == 2


@pytest.mark.parametrize("recompress", ["select", "distill"])
def test_new_data_for_a_class_already_held_is_merged_within_its_quota(digits, recompress):
    x, y = digits
    ones = (y == 1).nonzero().flatten()
    first, second = ones[:60], ones[60:120]
    zeros, twos = (y == 0).nonzero().flatten()[:60], (y == 2).nonzero().flatten()[:60]
    policy = DistilledBuffer(30, method="random", recompress=recompress, dataset_meta=DIGITS, progress=False)
    a = torch.cat([zeros, first])
    policy.update_from_tensors(x[a], y[a])
    assert policy.synthetic.counts() == {0: 15, 1: 15}
    b = torch.cat([second, twos])
    policy.update_from_tensors(x[b], y[b])
    assert policy.synthetic.counts() == {0: 10, 1: 10, 2: 10}
    held_ones = policy.synthetic.images[policy.synthetic.indices_of(1)].flatten(1)
    from_first = (held_ones[:, None] == x[first].flatten(1)[None]).all(-1).any(1)
    from_second = (held_ones[:, None] == x[second].flatten(1)[None]).all(-1).any(1)
    assert bool((from_first | from_second).all())  # random selects real images of class 1 only
    assert int(from_first.sum()) > 0 and int(from_second.sum()) > 0  # old and new data both kept


def test_buffer_from_another_dataset_is_refused(digits, tmp_path):
    x, y = digits
    mnist_like = SyntheticBuffer(torch.zeros(4, 1, 28, 28), torch.tensor([0, 0, 1, 1]), 10, meta=dataset_info("mnist").meta())
    policy = DistilledBuffer(20, method="random", dataset_meta=DIGITS, progress=False)
    with pytest.raises(ValueError, match="distilled from 'mnist' but this stream is 'digits'"):
        policy.set_synthetic(mnist_like)
    with pytest.raises(ValueError, match="distilled from 'mnist'"):
        policy.load(mnist_like.save(tmp_path / "mnist.safetensors"))
    # a buffer without dataset metadata is caught by its image shape when the stream arrives
    anonymous = DistilledBuffer(20, method="random", progress=False)
    anonymous.set_synthetic(SyntheticBuffer(torch.zeros(4, 1, 28, 28), torch.tensor([0, 0, 1, 1]), 10))
    with pytest.raises(ValueError, match=r"shape \(1, 8, 8\) but the buffer holds images of shape \(1, 28, 28\)"):
        anonymous.update_from_tensors(x[:50], y[:50])


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="unknown distillation method 'nope'"):
        DistilledBuffer(10, method="nope")
    with pytest.raises(ValueError, match=r"must not set \['ipc'\]"):
        DistilledBuffer(10, method="random", method_options={"ipc": 3})
    with pytest.raises(ValueError, match="max_size must be a positive int"):
        DistilledBuffer(0, method="random")
    with pytest.raises(ValueError, match="recompress must be one of"):
        DistilledBuffer(10, method="random", recompress="shrink")
    with pytest.raises(ValueError, match="differs from mem_size"):
        DistilledReplayPlugin(mem_size=10, storage_policy=DistilledBuffer(20, method="random"))


def test_class_quotas_split_the_budget_exactly():
    assert class_quotas([3, 1, 2], 10) == {1: 4, 2: 3, 3: 3}
    assert sum(class_quotas(range(7), 100).values()) == 100
    with pytest.raises(ValueError, match="smaller than the 3 classes"):
        class_quotas([0, 1, 2], 2)


def test_same_seed_gives_the_same_buffer(digits):
    x, y = digits
    buffers = []
    for _ in range(2):
        policy = DistilledBuffer(10, method="random", dataset_meta=DIGITS, seed=3, progress=False)
        policy.update_from_tensors(x[y < 4], y[y < 4])
        policy.update_from_tensors(x[(y >= 4) & (y < 6)], y[(y >= 4) & (y < 6)])
        buffers.append(policy.synthetic)
    assert torch.equal(buffers[0].images, buffers[1].images)


def test_uint8_storage_replays_exactly_what_is_saved(digits, tmp_path):
    x, y = digits
    policy = DistilledBuffer(20, method="random", storage="uint8", dataset_meta=DIGITS, progress=False)
    policy.update_from_tensors(x[y < 4], y[y < 4])
    held = policy.synthetic
    assert policy.nbytes() == 20 * 64 + 20  # one byte per pixel and per hard label
    reloaded = SyntheticBuffer.load(policy.save(tmp_path / "b.safetensors"))
    assert torch.allclose(reloaded.images, held.images, atol=1e-5)
    with pytest.raises(ValueError, match="needs dataset_meta with the dataset's mean and std"):
        DistilledBuffer(20, method="random", storage="uint8")


@pytest.mark.parametrize("other", ["lwf", "ewc"])
def test_composes_with_lwf_and_ewc(stream, other):
    from avalanche.training.plugins import EWCPlugin, LwFPlugin

    plugin = DistilledReplayPlugin(mem_size=10, method="random", dataset_meta=DIGITS, progress=False, batch_size_mem=16)
    strategy = make_strategy(StrategySpec("naive"), RunConfig(**{**CONFIG.__dict__, "epochs": 2}))
    strategy.plugins.extend([plugin, LwFPlugin(alpha=1.0, temperature=2.0) if other == "lwf" else EWCPlugin(ewc_lambda=10.0)])
    for exp in stream.train_stream[:3]:
        strategy.train(exp)
    assert plugin.buffer.counts() == {0: 2, 1: 2, 2: 2, 3: 2, 4: 1, 5: 1}
    assert all(torch.isfinite(p).all() for p in strategy.model.parameters())


# ------------------------------------------------------------ memory in bytes
def test_budget_in_bytes_holds_as_many_images_as_fit_and_no_more(stream):
    from replaykit.avalanche import images_for_bytes

    raw_bytes = 20 * (64 + 1)  # what raw replay of 20 uint8 digits holds
    assert images_for_bytes(raw_bytes, (1, 8, 8)) == 20
    assert images_for_bytes(raw_bytes, (1, 8, 8), bits=2) == raw_bytes // (16 + 1) == 76
    assert images_for_bytes(raw_bytes, (1, 8, 8), factor=2) == raw_bytes // (16 + 1)
    assert images_for_bytes(raw_bytes, (1, 8, 8), soft_classes=10) == raw_bytes // (64 + 1 + 20)
    plugin = DistilledReplayPlugin(mem_bytes=raw_bytes, method="random", method_options={"bits": 2} if False else {},
                                   storage="uint8", dataset_meta=DIGITS, progress=False, batch_size_mem=32)
    assert plugin.mem_size == plugin.storage_policy.max_size == 20
    policy = DistilledBuffer(method="dm", method_options={"bits": 2, "iterations": 2, "width": 16, "depth": 2, "real_batch": 16},
                             mem_bytes=raw_bytes, storage="uint8", dataset_meta=DIGITS, progress=False, recompress="select")
    assert policy.max_size == 76
    for exp in stream.train_stream:
        policy.post_adapt(None, exp)
        assert policy.nbytes() <= raw_bytes
    assert len(policy.synthetic) == 76 and policy.synthetic.meta["pixel_bits"] == 2
    assert policy.nbytes() == 76 * 17 and set(policy.synthetic.classes) == set(range(10))
    with pytest.raises(ValueError, match="in_shape"):
        DistilledBuffer(mem_bytes=1000, method="random", dataset_meta={"dataset": "digits"})
    with pytest.raises(ValueError, match="not both"):
        DistilledBuffer(30, method="random", mem_bytes=raw_bytes, storage="uint8", dataset_meta=DIGITS)
    with pytest.raises(ValueError, match="needs storage='uint8'"):
        DistilledBuffer(method="dm", method_options={"bits": 2}, mem_bytes=raw_bytes, dataset_meta=DIGITS)


def test_low_resolution_buffer_replays_decoded_images_and_mixes_resolution(stream):
    from replaykit.avalanche import MixedResolutionPlugin, low_resolution_view

    plugin = DistilledReplayPlugin(
        mem_bytes=1300, method="dm", method_options={"factor": 2, "iterations": 2, "width": 16, "depth": 2, "real_batch": 16},
        storage="uint8", recompress="select", dataset_meta=DIGITS, progress=False, batch_size_mem=32, mix=1.0,
    )
    strategy = make_strategy(StrategySpec("naive"), RunConfig(**{**CONFIG.__dict__, "epochs": 1}))
    strategy.plugins.append(plugin)
    seen = _BatchSpy(strategy, plugin).seen
    for exp in list(stream.train_stream)[:2]:
        strategy.train(exp)
    assert plugin.buffer.image_shape == (1, 4, 4) and plugin.buffer.decoded_shape == (1, 8, 8)
    assert tuple(plugin.storage_policy.buffer[0][0].shape) == (1, 8, 8)  # Avalanche replays decoded images
    # in the second experience (buffer at half resolution) every training image went through the low-resolution view
    assert torch.allclose(seen["after"][-1], low_resolution_view(seen["before"][-1], 2), atol=1e-5)
    assert torch.equal(seen["after"][0], seen["before"][0])  # first experience: no buffer yet, nothing mixed
    with pytest.raises(ValueError, match="p must lie"):
        MixedResolutionPlugin(2, p=1.5)


def test_soft_labels_come_from_the_learner_and_are_counted_as_float16(stream):
    spec_meta = dict(DIGITS)
    plugin = DistilledReplayPlugin(mem_bytes=20 * (64 + 1 + 20), method="random", storage="uint8", dataset_meta=spec_meta,
                                   num_classes=10, progress=False, batch_size_mem=32, soft_labels=True)
    strategy = make_strategy(StrategySpec("naive"), CONFIG)
    strategy.plugins.append(plugin)
    for exp in list(stream.train_stream)[:2]:
        strategy.train(exp)
    buf = plugin.buffer
    assert buf.is_soft and buf.meta["soft_label_storage"] == "float16" and len(buf) == 20
    assert buf.nbytes("uint8") == 20 * (64 + 1 + 20)
    assert torch.allclose(buf.labels.sum(1), torch.ones(20), atol=1e-3)
    assert torch.equal(buf.labels, buf.labels.half().float()) or torch.allclose(buf.labels, buf.labels.half().float(), atol=1e-3)
    assert (buf.labels.argmax(1) == buf.class_ids).float().mean() > 0.5  # the learner mostly agrees with the class
    with pytest.raises(ValueError, match="num_classes"):
        DistilledBuffer(10, method="random", soft_labels=True)


def test_two_workers_give_the_same_buffer_as_one(digits):
    x, y = digits
    keep = y < 4
    buffers = []
    for workers in (1, 2):
        policy = DistilledBuffer(8, "dm", {"iterations": 2, "width": 8, "depth": 2, "real_batch": 8}, dataset_meta=DIGITS,
                                 progress=False, workers=workers)
        policy.update_from_tensors(x[keep], y[keep])
        buffers.append(policy.synthetic)
    assert torch.equal(buffers[0].images, buffers[1].images) and torch.equal(buffers[0].labels, buffers[1].labels)
    with pytest.raises(ValueError, match="learner_aware"):
        DistilledBuffer(8, "dm", dataset_meta=DIGITS, learner_aware=True, workers=2)


def test_augment_replays_transformed_held_images_and_the_same_bytes(digits):
    x, y = digits
    plain = DistilledBuffer(20, method="random", storage="uint8", dataset_meta=DIGITS, progress=False)
    augmented = DistilledBuffer(20, method="random", storage="uint8", dataset_meta=DIGITS, progress=False, augment=True)
    for policy in (plain, augmented):
        policy.update_from_tensors(x[y < 4], y[y < 4])
    assert torch.equal(plain.synthetic.images, augmented.synthetic.images) and plain.nbytes() == augmented.nbytes()
    drawn = [augmented.buffer[i] for i in range(len(augmented.buffer))]
    assert sum(not torch.equal(d[0], plain.buffer[i][0]) for i, d in enumerate(drawn)) >= 10  # transformed when drawn
    assert [int(d[1]) for d in drawn] == augmented.synthetic.class_ids.tolist()


def test_jpeg_held_buffer_saves_exactly_what_it_replays(digits, tmp_path):
    x, y = digits
    policy = DistilledBuffer(method="random", storage="jpeg", jpeg_quality=30, mem_bytes=4_000, dataset_meta=DIGITS,
                             progress=False)
    policy.update_from_tensors(x[y < 2], y[y < 2])
    policy.update_from_tensors(x[(y >= 2) & (y < 4)], y[(y >= 2) & (y < 4)])
    held = policy.synthetic
    assert policy.nbytes() <= 4_000
    reloaded = SyntheticBuffer.load(policy.save(tmp_path / "b.safetensors"))
    assert torch.equal(reloaded.images, held.images)  # JPEG codes are held, not re-encoded on save


def test_jpeg_buffer_at_half_resolution_sizes_its_budget_at_the_held_resolution(digits):
    """The image budget of a JPEG buffer comes from encoded sizes; with ``factor`` 2 they must be the sizes of the
    half-resolution codes it holds (sized at full resolution, it filled about half its bytes)."""
    x, y = digits
    sizes = {}
    for factor in (1, 2):
        policy = DistilledBuffer(method="random", storage="jpeg", jpeg_quality=30, mem_bytes=4_000, dataset_meta=DIGITS,
                                 method_options={"factor": factor} if factor > 1 else {}, progress=False)
        policy.update_from_tensors(x[y < 2], y[y < 2])
        assert 0.85 * 4_000 <= policy.nbytes() <= 4_000, (factor, policy.nbytes())
        sizes[factor] = len(policy.synthetic)
    assert sizes[2] > 1.3 * sizes[1], sizes


class _BatchSpy:
    """Records every training mini-batch's images as a plugin placed before or after another one sees them."""

    def __init__(self, strategy, plugin):
        from avalanche.core import SupervisedPlugin

        self.seen: dict[str, list[torch.Tensor]] = {"before": [], "after": []}
        seen = self.seen

        class Spy(SupervisedPlugin):
            def __init__(self, key):
                super().__init__()
                self.key = key

            def before_forward(self, strategy, **kwargs):
                seen[self.key].append(strategy.mbatch[0].clone())

        strategy.plugins.insert(strategy.plugins.index(plugin), Spy("before"))
        strategy.plugins.append(Spy("after"))


@pytest.mark.parametrize("mix", [1.0, 0.0])
def test_jpeg_held_buffer_shows_training_batches_through_jpeg(stream, mix):
    from replaykit import jpeg

    plugin = DistilledReplayPlugin(mem_bytes=4_000, method="random", storage="jpeg", jpeg_quality=10, recompress="select",
                                   dataset_meta=DIGITS, progress=False, batch_size_mem=32, mix=mix)
    strategy = make_strategy(StrategySpec("naive"), RunConfig(**{**CONFIG.__dict__, "epochs": 1}))
    strategy.plugins.append(plugin)
    spy = _BatchSpy(strategy, plugin)
    for exp in list(stream.train_stream)[:2]:
        strategy.train(exp)
    before, after = spy.seen["before"][-1], spy.seen["after"][-1]
    assert torch.equal(spy.seen["after"][0], spy.seen["before"][0])  # first experience: nothing held, nothing mixed
    if mix == 0:
        assert torch.equal(after, before)
        return
    mean, std = (torch.tensor(DIGITS[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    assert torch.equal(after, jpeg.roundtrip(before, 10, mean, std))  # the buffer's own codec, at its quality
    assert (after - before).abs().max() > 0.1  # quality 10 changes the images visibly
    with pytest.raises(ValueError, match="mix must lie"):
        DistilledReplayPlugin(mem_bytes=4_000, method="random", storage="jpeg", dataset_meta=DIGITS, mix=-0.1)


def test_full_resolution_uint8_buffer_has_no_view_to_mix(digits):
    x, y = digits
    policy = DistilledBuffer(method="random", storage="uint8", mem_bytes=1_300, dataset_meta=DIGITS, progress=False)
    assert policy.view(x[:4]) is None  # nothing held yet
    policy.update_from_tensors(x[y < 2], y[y < 2])
    assert policy.view(x[:4]) is None  # uint8 at full resolution: nothing a learner could pick up


def test_held_logits_come_from_the_learner_are_counted_and_replayed_with_an_mse_term(stream):
    cost = 64 + 1 + 10 + 2  # uint8 8x8 digit, label, int8 logits over 10 classes and their float16 scale
    plugin = DistilledReplayPlugin(mem_bytes=20 * cost, method="random", storage="uint8", recompress="select", dataset_meta=DIGITS,
                                   num_classes=10, progress=False, batch_size_mem=32, logits=True)
    strategy = make_strategy(StrategySpec("naive"), CONFIG)
    strategy.plugins.append(plugin)
    extra = _record_loss_terms(plugin)
    experiences = list(stream.train_stream)[:2]
    strategy.train(experiences[0])
    first = plugin.buffer
    assert first.logits is not None and len(first) == 20 and first.nbytes("uint8") == 20 * cost
    strategy.model.eval()
    with torch.no_grad():  # the learner's own outputs on the images as held, right after it learnt them
        assert (strategy.model(first.decoded_images()) - first.logits).abs().max() < first.logits.abs().max() / 100
    assert extra and max(extra) == 0  # nothing held while the first experience trained
    extra.clear()
    strategy.train(experiences[1])
    assert extra and min(extra) > 0  # an MSE term joined every step's loss
    assert len(plugin.buffer) == 20 and plugin.buffer.logits.shape == (20, 10)


def _held_strategy(model, n_seen: int = 1):
    """What the held-target plugins read from a strategy: model, loss, device, experience clock, batch size."""
    return types.SimpleNamespace(model=model, loss=torch.zeros(()), device="cpu", train_mb_size=7,
                                 clock=types.SimpleNamespace(train_exp_counter=n_seen))


@pytest.mark.parametrize("kind", ["logits", "soft_labels"])
def test_held_target_plugins_add_their_weighted_term_over_what_the_buffer_holds(digits, kind):
    from replaykit.avalanche import LogitReplayPlugin, SoftLabelReplayPlugin
    from replaykit.training import soft_cross_entropy

    x, y = digits
    learner = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    policy = DistilledBuffer(20, method="random", storage="float32", recompress="select", dataset_meta=DIGITS, num_classes=10,
                             progress=False, **{kind: True})
    plugin_class = LogitReplayPlugin if kind == "logits" else SoftLabelReplayPlugin
    strategy = _held_strategy(learner)
    plugin = plugin_class(policy, weight=0.3, batch_size=20)
    plugin.before_training_exp(strategy)
    assert not plugin.active  # nothing held yet: no term
    policy.update_from_tensors(x[y < 4], y[y < 4], learner=learner)
    held = policy.synthetic
    plugin.before_training_exp(strategy)
    plugin.before_backward(strategy)  # one batch of all 20 held images: the term over the whole buffer
    with torch.no_grad():
        outputs = learner(held.decoded_images())
        expected = (torch.nn.functional.mse_loss(outputs, held.logits) if kind == "logits"
                    else soft_cross_entropy(outputs, held.labels))
    assert float(expected) > 0 and torch.allclose(strategy.loss.detach(), 0.3 * expected)
    other = (SoftLabelReplayPlugin if kind == "logits" else LogitReplayPlugin)(policy, batch_size=20)
    other.before_training_exp(strategy)
    assert not other.active  # the buffer holds the one kind of target only
    plugin.after_training_exp(strategy)
    assert not plugin.active
    for bad in (dict(weight=-1.0), dict(weight=float("nan")), dict(batch_size=0), dict(batch_size=True)):
        with pytest.raises(ValueError, match="weight|batch_size"):
            plugin_class(policy, **{"weight": 0.1, **bad})


def test_replay_parts_compose_in_a_strategy_and_old_plugin_checkpoints_migrate(stream):
    """Avalanche's ReplayPlugin over the buffer, plus logit replay and mixed views, each on its own; and a
    DistilledReplayPlugin pickled before it was made of parts opens with the same weights and draws."""
    import pickle

    from avalanche.training.plugins import ReplayPlugin

    from replaykit.avalanche import LogitReplayPlugin, MixedViewPlugin

    policy = DistilledBuffer(mem_bytes=4_000, method="random", storage="jpeg", jpeg_quality=10, recompress="select",
                             dataset_meta=DIGITS, num_classes=10, progress=False, logits=True)
    logit_replay = LogitReplayPlugin(policy, weight=0.1)
    strategy = make_strategy(StrategySpec("naive"), CONFIG)
    strategy.plugins.extend([ReplayPlugin(mem_size=policy.max_size, storage_policy=policy), logit_replay,
                             MixedViewPlugin(policy.view, p=0.5)])
    terms = _record_loss_terms(logit_replay)
    for exp in list(stream.train_stream)[:2]:
        strategy.train(exp)
    assert policy.synthetic.classes == [0, 1, 2, 3] and policy.synthetic.logits is not None
    assert terms and max(terms) > 0 and policy.nbytes() <= 4_000

    plugin = DistilledReplayPlugin(mem_size=20, method="random", dataset_meta=DIGITS, num_classes=10, progress=False,
                                   logits=True, recompress="select", logit_loss_weight=0.2, soft_loss_weight=0.7, mix=0.25, seed=4)
    state = plugin.__dict__.copy()
    old_gen = torch.Generator().manual_seed(4 * 7_777 + 11)
    torch.rand(5, generator=old_gen)  # draws the old plugin had made
    for part in ("logit_replay", "soft_replay", "mixed_view"):
        state.pop(part)
    state.update(logit_loss_weight=0.2, soft_loss_weight=0.7, mix=0.25, _mix_gen=old_gen, _soft_batches=None, _logit_batches=None)
    old = DistilledReplayPlugin.__new__(DistilledReplayPlugin)
    old.__setstate__(state)
    assert (old.logit_loss_weight, old.soft_loss_weight, old.mix) == (0.2, 0.7, 0.25)
    assert old.logit_replay.storage_policy is old.storage_policy and old.mixed_view._gen is old_gen
    restored = pickle.loads(pickle.dumps(old))
    assert (restored.logit_loss_weight, restored.mix, restored.seed) == (0.2, 0.25, 4)


def test_logit_buffers_refuse_what_would_lose_their_logits(digits):
    x, y = digits
    with pytest.raises(ValueError, match="num_classes"):
        DistilledBuffer(10, method="random", logits=True)
    with pytest.raises(ValueError, match="recompress='select'"):
        DistilledBuffer(10, method="dm", num_classes=10, logits=True)
    buffer = DistilledBuffer(10, method="random", num_classes=10, recompress="select", logits=True, progress=False)
    with pytest.raises(ValueError, match="pass the learner"):
        buffer.update_from_tensors(x[y < 2], y[y < 2])


# ----------------------------------------------------------- distilled core + prefix
def test_core_distills_for_the_final_quota_and_prefix_drops_the_real_fill_first(digits):
    x, y = digits
    # 40 images over 10 classes: final quota 4, core 0.5 -> 2 distilled images per class, stored first
    policy = DistilledBuffer(40, method="dm", method_options={"iterations": 3, "real_batch": 8, "width": 8},
                             recompress="prefix", core=0.5, num_classes=10, dataset_meta=DIGITS, progress=False)
    assert policy.core_ipc() == 2
    a = y < 2
    policy.update_from_tensors(x[a], y[a])
    assert policy.synthetic.counts() == {0: 20, 1: 20}
    zeros = policy.synthetic.images[policy.synthetic.indices_of(0)].flatten(1)
    is_real = (zeros[:, None] == x[y == 0].flatten(1)[None]).all(-1).any(1)
    assert is_real.tolist() == [False, False] + [True] * 18  # the distilled core first, then real fill
    first_core = zeros[:2].clone()
    b = (y >= 2) & (y < 10)
    policy.update_from_tensors(x[b], y[b])
    assert policy.synthetic.counts() == {c: 4 for c in range(10)}
    kept = policy.synthetic.images[policy.synthetic.indices_of(0)].flatten(1)
    assert torch.equal(kept[:2], first_core)  # the core survives the shrink; the fill went first
    assert policy.synthetic.meta["core_ipc"] == 2


def test_herding_with_prefix_keeps_herding_order_as_classes_arrive(digits):
    x, y = digits
    policy = DistilledBuffer(20, method="herding", method_options={"feature": "random"}, recompress="prefix",
                             dataset_meta=DIGITS, progress=False)
    a = y < 2
    policy.update_from_tensors(x[a], y[a])
    wide = policy.synthetic.images[policy.synthetic.indices_of(0)].clone()
    policy.update_from_tensors(x[(y >= 2) & (y < 4)], y[(y >= 2) & (y < 4)])
    narrow = policy.synthetic.images[policy.synthetic.indices_of(0)]
    assert torch.equal(narrow, wide[: len(narrow)])  # the greedy prefix, not a random part


def test_a_herding_fill_is_herding_s_own_pick_after_the_core(digits):
    x, y = digits
    common = dict(recompress="prefix", num_classes=10, dataset_meta=DIGITS, progress=False)
    hybrid = DistilledBuffer(40, method="dm", method_options={"iterations": 2, "real_batch": 8, "width": 8}, core=0.5,
                             fill="herding", **common)
    seed = hybrid._class_seed(0) + 17  # the fill's seed in this update (herding's feature net)
    a = y < 2
    hybrid.update_from_tensors(x[a], y[a])
    assert hybrid.synthetic.counts() == {0: 20, 1: 20} and hybrid.synthetic.meta["fill"] == "herding"
    filled = hybrid.synthetic.images[hybrid.synthetic.indices_of(0)][2:]
    picked = distill.make("herding", ipc=18, seed=seed, progress=False).distill(x[y == 0], y[y == 0], num_classes=10, meta=DIGITS)
    random_fill = distill.make("random", ipc=18, seed=seed, progress=False).distill(x[y == 0], y[y == 0], num_classes=10, meta=DIGITS)
    assert torch.equal(filled, picked.images)  # herding's greedy order, after the distilled core
    assert not torch.equal(filled, random_fill.images)


def test_a_complement_core_is_learned_beside_the_fill_that_every_class_keeps(digits):
    x, y = digits
    options = {"iterations": 3, "real_batch": 8, "width": 8}
    common = dict(max_size=40, method="dm", method_options=options, core=0.5, recompress="prefix", num_classes=10, seed=2)
    plain = DistilledBuffer(config=BufferConfig(**common), dataset_meta=DIGITS, progress=False)
    complement = DistilledBuffer(config=BufferConfig(**common, complement=True), dataset_meta=DIGITS, progress=False)
    a = y < 2
    plain.update_from_tensors(x[a], y[a])
    complement.update_from_tensors(x[a], y[a])
    ours, theirs = (p.synthetic.images[p.synthetic.indices_of(0)] for p in (complement, plain))
    assert complement.synthetic.counts() == {0: 20, 1: 20} and complement.synthetic.meta["complement"] is True
    assert torch.equal(ours[2:], theirs[2:])  # the same real fill, picked first
    assert not torch.equal(ours[:2], theirs[:2])  # a different core: learned beside the fill
    seen = {}
    real_make = distill.make

    def spy(name, **kw):
        if "beside" in kw:
            seen.update({c: v.shape[0] for c, v in kw["beside"].items()})
        return real_make(name, **kw)

    complement_again = DistilledBuffer(config=BufferConfig(**common, complement=True), dataset_meta=DIGITS, progress=False)
    distill.make = spy
    try:
        complement_again.update_from_tensors(x[a], y[a])
    finally:
        distill.make = real_make
    assert seen == {0: 2, 1: 2}  # beside the 2 fill images each class keeps at its final quota of 4, not the 18 it holds now
    assert torch.equal(complement_again.synthetic.images, complement.synthetic.images)  # same seed, same buffer


def test_the_buffer_tells_boundary_how_many_classes_the_learner_has_seen(digits):
    x, y = digits
    with seeded(0):
        learner = ConvNet(x.shape[1:], 10, width=8, depth=2)
    train_classifier(learner, x, y, epochs=2, seed=0)
    options = {"iterations": 5, "margin": 0.5, "start": "random", "min_seen": 4}
    common = dict(max_size=40, method_options=options, recompress="prefix", num_classes=10, seed=3, learner_aware=True)
    moved = DistilledBuffer(config=BufferConfig(method="boundary", **common), dataset_meta=DIGITS, progress=False)
    twin = DistilledBuffer(config=BufferConfig(method="random", **dict(common, method_options={}, learner_aware=False)),
                           dataset_meta=DIGITS, progress=False)
    for classes in ((0, 1), (2, 3)):
        mask = (y == classes[0]) | (y == classes[1])
        moved.update_from_tensors(x[mask], y[mask], learner=learner)
        twin.update_from_tensors(x[mask], y[mask], learner=learner)
    for cls, kept in ((0, True), (1, True), (2, False), (3, False)):  # 2 classes seen at the first experience, 4 at the second
        ours, theirs = (b.synthetic.images[b.synthetic.indices_of(cls)] for b in (moved, twin))
        assert torch.equal(ours, theirs) == kept, f"class {cls}"
    with pytest.raises(ValueError, match=r"must not set \['seen'\]"):
        BufferConfig(method="boundary", **dict(common, method_options={"seen": 10}))


def test_a_spec_s_complement_reaches_the_storage_policy():
    strategy = make_strategy(StrategySpec("distilled", 40, "dm", {"iterations": 2}, recompress="prefix",
                                          options={"core": 0.5, "complement": True, "logits": True}), CONFIG)
    policy = next(p.storage_policy for p in strategy.plugins if isinstance(p, DistilledReplayPlugin))
    assert policy.complement is True and policy.core == 0.5 and policy.logits is True and policy.max_size == 40


def test_complement_needs_a_hybrid_core_and_dm():
    with pytest.raises(ValueError, match="complement .* needs core below 1"):
        BufferConfig(max_size=40, method="dm", num_classes=10, recompress="prefix", complement=True)
    with pytest.raises(ValueError, match="complement .* needs core below 1"):
        BufferConfig(max_size=40, method="dm", core=1.0, num_classes=10, recompress="prefix", complement=True)
    with pytest.raises(ValueError, match="complement needs a method that matches beside"):
        BufferConfig(max_size=40, method="dm-multi", core=0.5, num_classes=10, recompress="prefix", complement=True)
    with pytest.raises(ValueError, match="complement='True' must be bool"):
        BufferConfig(max_size=40, method="dm", core=0.5, num_classes=10, recompress="prefix", complement="True")


def test_core_options_are_checked():
    with pytest.raises(ValueError, match="fill must be a selecting method"):
        DistilledBuffer(40, method="dm", core=0.5, num_classes=10, recompress="prefix", fill="dm")
    with pytest.raises(ValueError, match="needs core"):
        DistilledBuffer(40, method="dm", num_classes=10, recompress="prefix", fill="herding")
    with pytest.raises(ValueError, match="fill selection method"):
        DistilledBuffer(40, method="dm", core=0.5, num_classes=10, recompress="prefix", fill="herd")
    with pytest.raises(ValueError, match="recompress='prefix'"):
        DistilledBuffer(40, method="dm", core=1.0, num_classes=10, recompress="select")
    with pytest.raises(ValueError, match="num_classes"):
        DistilledBuffer(40, method="dm", core=1.0, recompress="prefix")
    with pytest.raises(ValueError, match="share"):
        DistilledBuffer(40, method="dm", core=1.5, num_classes=10, recompress="prefix")


# ----------------------------------------------------------------- typed configuration
def test_config_types_are_strict_and_a_false_switch_stays_off():
    assert BufferConfig(max_size=10, augment=False).augment is False
    assert DistilledBuffer(10, method="random", augment=False).augment is False
    for key, bad in (("augment", "False"), ("augment", 1), ("logits", "true"), ("max_size", True), ("jpeg_quality", 10.0), ("seed", "0")):
        with pytest.raises(ValueError, match=f"option {key}={bad!r} must be"):
            BufferConfig(**{"max_size": 10, key: bad})
    with pytest.raises(ValueError, match="augment='False' must be bool"):
        DistilledBuffer(10, method="random", augment="False")  # the keyword form is the same check
    with pytest.raises(ValueError, match="iterations=True must be int"):
        BufferConfig(max_size=10, method_options={"iterations": True})


def test_config_unknown_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown BufferConfig fields \['augmnt'\]"):
        BufferConfig.from_json({"max_size": 10, "augmnt": True})
    with pytest.raises(ValueError, match="method 'dm' has no option 'iteratons'"):
        BufferConfig(max_size=10, method_options={"iteratons": 100})
    with pytest.raises(ValueError, match=r"keyword options \['seed'\], not both"):
        DistilledBuffer(config=BufferConfig(max_size=10, method="random"), seed=3)


def test_config_identity_tells_every_field_apart():
    few, many = (BufferConfig(mem_bytes=78_500, method_options={"iterations": n}) for n in (100, 300))
    assert few.identity != many.identity
    assert BufferConfig(max_size=10, soft_temperature=2).identity == BufferConfig(max_size=10, soft_temperature=2.0).identity
    assert BufferConfig(max_size=10, seed=1).identity != BufferConfig(max_size=10).identity


def test_config_round_trips_through_json():
    import json

    config = BufferConfig(mem_bytes=78_500, method="dm", method_options={"iterations": 300, "lr": 1, "factor": 2}, storage="jpeg",
                          jpeg_quality=2, recompress="select", logits=True, num_classes=10, seed=4, augment=True)
    again = BufferConfig.from_json(json.loads(json.dumps(config.to_json())))
    assert again == config and again.identity == config.identity
    assert again.method_options["lr"] == 1.0 and isinstance(again.method_options["lr"], float)  # a float option is a float


def test_keyword_and_config_forms_give_the_same_buffer(digits, tmp_path):
    x, y = digits
    options = dict(method="random", storage="uint8", seed=3, recompress="select", augment=False)
    config = BufferConfig(max_size=20, **options)
    by_keywords = DistilledBuffer(20, dataset_meta=DIGITS, progress=False, **options)
    by_config = DistilledBuffer(config=config, dataset_meta=DIGITS, progress=False)
    assert by_keywords.config == config
    for policy in (by_keywords, by_config):
        policy.update_from_tensors(x[y < 4], y[y < 4])
        policy.update_from_tensors(x[(y >= 4) & (y < 6)], y[(y >= 4) & (y < 6)])
    a, b = by_keywords.synthetic, by_config.synthetic
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.nbytes("uint8") == b.nbytes("uint8")
    loaded = SyntheticBuffer.load(by_config.save(tmp_path / "b.safetensors"))
    assert BufferConfig.from_json(loaded.meta["config"]) == config  # a saved buffer says how it was made
    plugin = DistilledReplayPlugin(config=config, dataset_meta=DIGITS, progress=False)
    assert (plugin.storage_policy.config, plugin.mem_size, plugin.seed) == (config, 20, 3)
    with pytest.raises(ValueError, match=r"keyword options \['max_size'\]"):
        DistilledReplayPlugin(mem_size=20, config=config, dataset_meta=DIGITS)


def test_buffer_options_are_its_resolved_config_read_only_and_old_checkpoints_migrate(digits):
    import pickle

    from replaykit.avalanche.storage import RESOLVED_FIELDS

    config = BufferConfig(max_size=20, method="random", storage="uint8", seed=3, recompress="select", num_classes=10)
    policy = DistilledBuffer(config=config, dataset_meta=DIGITS, progress=False)
    assert policy.resolved == config and all(getattr(policy, n) == getattr(config, n) for n in RESOLVED_FIELDS)
    with pytest.raises(AttributeError, match="storage is part of the buffer's configuration"):
        policy.storage = "float16"
    policy.method_options["iterations"] = 5  # a copy: the configuration in force is unchanged
    assert policy.resolved.method_options == {}
    x, y = digits
    policy.update_from_tensors(x[y < 4], y[y < 4])
    restored = pickle.loads(pickle.dumps(policy))
    assert restored.resolved == config and torch.equal(restored.synthetic.images, policy.synthetic.images)
    # A checkpoint written before the buffer kept its resolved config whole held each option as an attribute.
    old = policy.__getstate__()
    resolved = old.pop("resolved")
    old.update({n: getattr(resolved, n) for n in RESOLVED_FIELDS})
    migrated = DistilledBuffer.__new__(DistilledBuffer)
    migrated.__setstate__(old)
    assert migrated.resolved == config and (migrated.storage, migrated.seed, migrated.max_size) == ("uint8", 3, 20)
    migrated.update_from_tensors(x[(y >= 4) & (y < 6)], y[(y >= 4) & (y < 6)])
    assert migrated.synthetic.classes == [0, 1, 2, 3, 4, 5]


# ----------------------------------------------------------------- devices
class _Strategy(types.SimpleNamespace):
    """What ``post_adapt`` reads from a strategy: its model and its device."""


def _spy_make(monkeypatch):
    """Record the device each distiller is asked for, then build it on the CPU (this machine's device)."""
    import replaykit.avalanche as plugin_module
    from replaykit import distill

    asked: list[str] = []
    real_make = distill.make

    def make(name, **options):
        asked.append(str(options.pop("device")))
        return real_make(name, device="cpu", **options)

    monkeypatch.setattr(distill, "make", make)
    monkeypatch.setattr(plugin_module, "resolve_device", torch.device)  # lets a CUDA name through on a CPU machine
    return asked


@pytest.mark.parametrize("distill_device, expected", [(None, "cuda:3"), ("cpu", "cpu")])
def test_distillation_follows_the_strategy_device_unless_distill_device_says_otherwise(digits, monkeypatch, distill_device, expected):
    x, y = digits
    keep = y < 2
    policy = DistilledBuffer(4, "random", dataset_meta=DIGITS, progress=False, distill_device=distill_device)
    asked = _spy_make(monkeypatch)
    policy.post_adapt(_Strategy(device=torch.device("cuda:3"), model=None), _fake_exp(x[keep], y[keep]))
    assert asked == [expected, expected]  # one distiller per new class, each where it was asked
    assert policy.synthetic.images.device.type == "cpu" and policy._device() == (distill_device or "cpu")


def test_held_logits_are_computed_where_the_learner_lives_and_kept_on_the_host(digits):
    from replaykit.networks import ConvNet

    x, y = digits
    keep = y < 2

    class Recording(ConvNet):
        seen: list[torch.device] = []

        def forward(self, images):
            self.seen.append(images.device)
            assert images.device == next(self.parameters()).device
            return super().forward(images)

    torch.manual_seed(0)
    learner = Recording(x.shape[1:], 10, width=8, depth=2).to(torch.device("cpu"))
    policy = DistilledBuffer(4, "random", dataset_meta=DIGITS, num_classes=10, progress=False, logits=True, recompress="select",
                             distill_device=torch.device("cpu"))
    policy.update_from_tensors(x[keep], y[keep], learner=learner)
    assert Recording.seen and policy.synthetic.logits.device.type == "cpu" and policy.distill_device == "cpu"


def test_distill_device_is_checked_and_not_a_method_option():
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        DistilledBuffer(4, "random", distill_device="gpu")
    with pytest.raises(ValueError, match=r"must not set \['device'\]"):
        DistilledBuffer(4, "random", method_options={"device": "cpu"})


def test_mixed_views_land_on_the_batch_device(digits):
    """``mix_view`` and both codec views give back tensors on the device of the batch they replace."""
    from replaykit.avalanche import mix_view
    from replaykit.compressed import CompressedReplayBuffer

    x, y = digits
    jpeg = CompressedReplayBuffer(2000, DIGITS, codec="jpeg", quality=50)
    jpeg.update_from_tensors(x[:40], y[:40])
    batch = x[:16].to(torch.device("cpu"))
    viewed = jpeg.view(batch)
    assert viewed.device == batch.device and viewed.shape == batch.shape and not torch.equal(viewed, batch)
    strategy = types.SimpleNamespace(mbatch=[batch.clone(), y[:16]])
    mix_view(strategy, jpeg.view, 1.0, torch.Generator().manual_seed(0))
    assert strategy.mbatch[0].device == batch.device and torch.equal(strategy.mbatch[0], viewed)


@pytest.mark.cuda
def test_headline_plugin_on_a_cuda_strategy(stream):
    """The issue's crash: dm, JPEG q2, logits, mix 0.5 on a CUDA strategy; distillation on the strategy's device."""
    from replaykit.continual import parse_spec

    spec = parse_spec("distilled:4000B:dm:jpeg:quality=2:iterations=5:recompress=select:logits=1:mix=0.5:augment=1")
    result = run(spec, RunConfig(**{**CONFIG.__dict__, "epochs": 1, "device": "cuda"}), stream)
    assert len(result.accuracy_matrix) == 5 and len(result.distill_seconds) == 5
    assert result.buffer.images.device.type == result.buffer.logits.device.type == "cpu"
