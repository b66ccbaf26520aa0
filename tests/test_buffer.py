import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from replaykit.buffer import BufferFormatError, SyntheticBuffer, _header_digest

META = {"dataset": "digits", "mean": [0.3], "std": [0.4], "method": "test", "ipc": 2}


def make_buffer(n_per_class=2, classes=(0, 1, 2), k=3, soft=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([c for c in classes for _ in range(n_per_class)], dtype=torch.int64)
    images = torch.randn(len(ids), 1, 8, 8, generator=gen)
    labels = torch.softmax(torch.randn(len(ids), k, generator=gen), 1) if soft else ids.clone()
    return SyntheticBuffer(images, labels, k, ids, dict(META))


@pytest.mark.parametrize("soft", [False, True])
def test_float32_round_trip_is_exact(tmp_path, soft):
    buf = make_buffer(soft=soft)
    path = buf.save(tmp_path / "buf.safetensors")
    back = SyntheticBuffer.load(path)
    assert torch.equal(back.images, buf.images)
    assert torch.equal(back.labels, buf.labels)
    assert torch.equal(back.class_ids, buf.class_ids)
    assert back.num_classes == 3 and back.is_soft == soft
    assert back.meta["method"] == "test" and back.meta["created"] == buf.meta["created"]
    assert back.meta["versions"]["torch"] == torch.__version__


def test_reduced_precision_storage_is_smaller_and_close(tmp_path):
    buf = make_buffer(n_per_class=20)
    buf.images = buf.images.clamp(-0.3 / 0.4, 0.7 / 0.4)  # inside the pixel range [0, 1]
    sizes = {}
    for storage, tol in [("float32", 0), ("float16", 2e-3), ("uint8", 0.5 / 255 / 0.4 + 1e-5)]:
        path = buf.save(tmp_path / f"{storage}.safetensors", storage=storage)
        sizes[storage] = path.stat().st_size
        back = SyntheticBuffer.load(path)
        assert back.images.dtype == torch.float32
        assert (back.images - buf.images).abs().max() <= tol
    assert sizes["uint8"] < sizes["float16"] < sizes["float32"]
    assert buf.nbytes("uint8") * 4 - buf.labels.numel() * 3 == buf.nbytes("float32")


def test_tampered_file_is_refused(tmp_path):
    path = make_buffer().save(tmp_path / "buf.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # flip bits inside the tensor data
    path.write_bytes(bytes(raw))
    with pytest.raises(BufferFormatError, match="checksum"):
        SyntheticBuffer.load(path)


def test_truncated_file_is_refused(tmp_path):
    path = make_buffer().save(tmp_path / "buf.safetensors")
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(BufferFormatError, match="truncated or corrupt"):
        SyntheticBuffer.load(path)


def test_garbage_and_foreign_files_are_refused(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 7)
    with pytest.raises(BufferFormatError):
        SyntheticBuffer.load(junk)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"images": torch.zeros(1, 1, 2, 2)}, str(foreign))
    with pytest.raises(BufferFormatError, match="no ReplayKit header"):
        SyntheticBuffer.load(foreign)
    with pytest.raises(FileNotFoundError):
        SyntheticBuffer.load(tmp_path / "missing.safetensors")


def _rewrite_header(path, edit):
    """Edit the JSON header of a safetensors file in place (keeping its length valid)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def test_header_claiming_other_checksum_or_version_is_refused(tmp_path):
    path = make_buffer().save(tmp_path / "buf.safetensors")

    def bump_version(header):
        meta = json.loads(header["__metadata__"]["replaykit"])
        meta["format_version"] = 99
        meta["header_sha256"] = _header_digest(meta)  # a consistent forgery: only the version check can refuse it
        header["__metadata__"]["replaykit"] = json.dumps(meta)

    _rewrite_header(path, bump_version)
    with pytest.raises(BufferFormatError, match="format version"):
        SyntheticBuffer.load(path)


@pytest.mark.parametrize("edit", [
    lambda h: h["meta"].__setitem__("mean", [0.2]),  # valid JSON, other normalisation: other pixels on load
    lambda h: h.__setitem__("num_classes", 11),
    lambda h: h.__setitem__("storage", "float16"),
])
def test_header_edited_without_its_checksum_is_refused(tmp_path, edit):
    """Regression (fuzzing, issue 25): the tensors' checksum did not cover the header, so an edited normalisation or
    class count loaded as different data without an error."""
    path = make_buffer().with_meta(mean=[0.1], std=[0.3]).save(tmp_path / "buf.safetensors", storage="uint8")

    def change(header):
        meta = json.loads(header["__metadata__"]["replaykit"])
        edit(meta)
        header["__metadata__"]["replaykit"] = json.dumps(meta)

    _rewrite_header(path, change)
    with pytest.raises(BufferFormatError, match="header does not match its checksum"):
        SyntheticBuffer.load(path)


def test_header_that_is_not_an_object_is_a_format_error(tmp_path):
    path = make_buffer().save(tmp_path / "buf.safetensors")
    _rewrite_header(path, lambda header: header["__metadata__"].__setitem__("replaykit", "[1, 2]"))
    with pytest.raises(BufferFormatError, match="not an object"):
        SyntheticBuffer.load(path)


def test_nan_written_by_someone_else_is_refused_even_with_valid_checksum(tmp_path):
    # A file whose checksum matches its (bad) content: structure checks must still catch it.
    buf = make_buffer()
    path = buf.save(tmp_path / "buf.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save_file

    from replaykit.buffer import _tensor_digest

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["images"][0, 0, 0, 0] = float("nan")
    header = json.loads(meta["replaykit"])
    header["sha256"] = _tensor_digest(tensors)
    save_file(tensors, str(path), metadata={"replaykit": json.dumps(header)})
    with pytest.raises(BufferFormatError, match="NaN"):
        SyntheticBuffer.load(path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(images=torch.randn(2, 8, 8), labels=torch.tensor([0, 1])), r"\[N, C, H, W\]"),
        (dict(images=torch.randn(2, 1, 8, 8).double(), labels=torch.tensor([0, 1])), "float32"),
        (dict(images=torch.randn(2, 1, 8, 8), labels=torch.tensor([0, 1], dtype=torch.int32)), "int64"),
        (dict(images=torch.randn(3, 1, 8, 8), labels=torch.tensor([0, 1])), "counts must match"),
        (dict(images=torch.randn(2, 1, 8, 8), labels=torch.tensor([0, 5])), r"labels must lie in \[0, 2\]"),
        (dict(images=torch.randn(2, 1, 8, 8), labels=torch.tensor([-1, 0])), r"must lie in \[0, 2\]"),
        (dict(images=torch.full((2, 1, 8, 8), float("inf")), labels=torch.tensor([0, 1])), "NaN or inf"),
        (dict(images=torch.randn(2, 1, 8, 8), labels=torch.rand(2, 3)), "probability rows"),
        (dict(images=torch.randn(2, 1, 8, 8), labels=torch.softmax(torch.randn(2, 4), 1)), "columns"),
        (dict(images=torch.randn(2, 1, 8, 8), labels=torch.tensor([[float("nan"), 1.0, 0.0]] * 2)), "NaN"),
    ],
)
def test_malformed_buffers_are_refused_with_the_problem_named(kwargs, message):
    with pytest.raises(BufferFormatError, match=message):
        SyntheticBuffer(num_classes=3, **kwargs)


def test_class_index_subset_and_concat():
    a = make_buffer(classes=(0, 1))
    b = make_buffer(classes=(2,), n_per_class=3, soft=True, seed=1)
    joined = SyntheticBuffer.concat([a, b])
    assert joined.is_soft and len(joined) == 7
    assert joined.counts() == {0: 2, 1: 2, 2: 3}
    assert torch.equal(joined.soft_targets()[:4].argmax(1), a.labels)
    only2 = joined.select_classes([2])
    assert only2.classes == [2] and torch.equal(only2.images, b.images)
    assert torch.equal(joined.indices_of(1), torch.tensor([2, 3]))
    with pytest.raises(BufferFormatError, match="cannot join"):
        SyntheticBuffer.concat([a, SyntheticBuffer(torch.zeros(1, 1, 4, 4), torch.tensor([0]), 3)])


def test_pixels_undo_normalisation():
    buf = make_buffer()
    px = buf.pixels()
    expected = (buf.images * 0.4 + 0.3).clamp(0, 1)
    assert torch.allclose(px, expected)
    assert px.min() >= 0 and px.max() <= 1


def test_empty_buffer_round_trips(tmp_path):
    empty = SyntheticBuffer.empty((1, 8, 8), 10, META)
    back = SyntheticBuffer.load(empty.save(tmp_path / "e.safetensors"))
    assert len(back) == 0 and back.classes == [] and back.image_shape == (1, 8, 8)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 6),
    c=st.sampled_from([1, 3]),
    k=st.integers(1, 5),
    storage=st.sampled_from(["float32", "float16"]),
    seed=st.integers(0, 1000),
)
def test_round_trip_property(tmp_path_factory, n, c, k, storage, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, k, (n,), generator=gen)
    buf = SyntheticBuffer(torch.randn(n, c, 5, 4, generator=gen), ids, k, meta={"mean": [0.5] * c, "std": [0.2] * c})
    path = buf.save(tmp_path_factory.mktemp("prop") / "b.safetensors", storage=storage)
    back = SyntheticBuffer.load(path)
    assert back.counts() == buf.counts()
    assert torch.allclose(back.images, buf.images, atol=0 if storage == "float32" else 5e-3 * buf.images.abs().max().item())


# ------------------------------------------------- compact parameterisations
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_packed_grey_levels_round_trip_and_take_the_bytes_nbytes_counts(tmp_path, bits):
    from safetensors import safe_open

    buf = SyntheticBuffer(make_buffer().images, make_buffer().labels, 3, None, dict(META, pixel_bits=bits))
    held = buf.quantized()
    levels = 2**bits - 1
    pixels = held.pixels() * levels
    assert torch.allclose(pixels, pixels.round(), atol=1e-4)  # exactly 2**bits grey levels
    path = buf.save(tmp_path / "b.safetensors", storage="uint8")
    with safe_open(str(path), framework="pt") as handle:
        stored = handle.get_tensor("images")
    assert stored.numel() == len(buf) * -(-64 * bits // 8)  # 64 pixels at `bits` bits, whole bytes per image
    assert buf.nbytes("uint8") == stored.numel() + len(buf)  # + one label byte each
    back = SyntheticBuffer.load(path)
    assert back.image_shape == (1, 8, 8) and torch.allclose(back.images, held.images, atol=1e-5)


def test_low_resolution_buffer_decodes_to_the_network_resolution(tmp_path):
    small = torch.randn(4, 1, 4, 4)
    buf = SyntheticBuffer(small, torch.tensor([0, 0, 1, 1]), 2, None, dict(META, decoder={"kind": "upsample", "factor": 2, "mode": "bilinear"}))
    assert buf.image_shape == (1, 4, 4) and buf.decoded_shape == (1, 8, 8) and buf.decoder_factor == 2
    decoded = buf.decoded_images()
    assert decoded.shape == (4, 1, 8, 8)
    assert torch.allclose(decoded, torch.nn.functional.interpolate(small, size=(8, 8), mode="bilinear", align_corners=False))
    assert buf.nbytes("uint8") == 4 * 16 + 4  # the bytes are the low-resolution pixels
    back = SyntheticBuffer.load(buf.save(tmp_path / "low.safetensors", storage="uint8"))
    assert back.decoded_shape == (1, 8, 8)
    full = SyntheticBuffer(torch.randn(2, 1, 4, 4), torch.tensor([0, 1]), 2, None, dict(META))  # same shape, no decoder
    with pytest.raises(BufferFormatError, match="different resolutions"):
        SyntheticBuffer.concat([buf, full])


@pytest.mark.parametrize("meta, message", [
    ({"decoder": {"kind": "vae"}}, "unknown decoder"),
    ({"decoder": {"kind": "upsample", "factor": 0}}, "factor must be a positive int"),
    ({"pixel_bits": 3}, "pixel_bits must be one of"),
])
def test_bad_parameterisations_are_named(meta, message):
    with pytest.raises(BufferFormatError, match=message):
        SyntheticBuffer(torch.zeros(1, 1, 4, 4), torch.tensor([0]), 1, None, dict(META, **meta))


def test_packed_file_with_the_wrong_row_length_is_refused(tmp_path):
    from safetensors.torch import save_file

    buf = SyntheticBuffer(make_buffer().images, make_buffer().labels, 3, None, dict(META, pixel_bits=2))
    path = buf.save(tmp_path / "b.safetensors", storage="uint8")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    header = json.loads(metadata["replaykit"])
    tensors["images"] = tensors["images"][:, :-1].contiguous()
    from replaykit.buffer import _tensor_digest

    header["sha256"] = _tensor_digest(tensors)  # a consistent checksum: the shape itself is wrong
    save_file(tensors, str(path), metadata={"replaykit": json.dumps(header)})
    with pytest.raises(BufferFormatError, match="do not hold"):
        SyntheticBuffer.load(path)


def _pixel_range_buffer(n_per_class=6, quality=30):
    buf = make_buffer(n_per_class=n_per_class)
    buf.images = buf.images.clamp(-0.3 / 0.4, 0.7 / 0.4)  # inside the pixel range [0, 1]
    return buf.with_meta(jpeg_quality=quality)


def test_jpeg_storage_round_trip_keeps_the_held_codes(tmp_path):
    held = _pixel_range_buffer().quantized("jpeg")
    first = held.save(tmp_path / "a.safetensors", storage="jpeg")
    back = SyntheticBuffer.load(first)
    assert torch.equal(back.images, held.images)  # what is held is what comes back
    again = back.save(tmp_path / "b.safetensors", storage="jpeg")  # JPEG is not idempotent: the codes are kept instead
    from safetensors.torch import load_file

    assert torch.equal(load_file(first)["images"], load_file(again)["images"])
    assert torch.equal(back.quantized("jpeg").images, held.images)
    assert held.nbytes("jpeg") == load_file(first)["images"].numel() + held.label_nbytes()


def test_jpeg_codes_follow_subsets_and_concat_but_not_edits():
    held = _pixel_range_buffer().quantized("jpeg")
    header, bodies = held._jpeg_codes()
    part = held.select_classes([1])
    assert [b.tolist() for b in part._jpeg_codes()[1]] == [bodies[i].tolist() for i in held.indices_of(1).tolist()]
    fresh = make_buffer(n_per_class=2, classes=(2,), seed=5).with_meta(jpeg_quality=30)
    joined = SyntheticBuffer.concat([part, fresh])
    joined_bodies = joined._jpeg_codes()[1]
    assert [b.tolist() for b in joined_bodies[: len(part)]] == [b.tolist() for b in part._jpeg_codes()[1]]
    assert torch.equal(joined.quantized("jpeg").images[: len(part)], part.images)  # no second generation of loss
    edited = held.quantized("jpeg")
    edited.images.add_(0.5)  # an in-place edit invalidates the held codes
    assert held._held_jpeg_codes() is not None and edited._held_jpeg_codes() is None


def test_held_logits_are_int8_with_a_scale_counted_and_round_trip_exactly(tmp_path):
    buf = make_buffer()
    raw = torch.randn(len(buf), 3, generator=torch.Generator().manual_seed(1)) * 5
    held = buf.with_logits(raw)
    assert (held.logits - raw).abs().max() <= raw.abs().amax(1).max() / 127  # rounded to int8 steps of each row
    assert held.nbytes("uint8") == buf.nbytes("uint8") + len(buf) * (3 + 2)  # an int8 per class + a float16 scale
    path = held.save(tmp_path / "logits.safetensors", storage="uint8")
    back = SyntheticBuffer.load(path)
    assert torch.equal(back.logits, held.logits)
    assert back.nbytes("uint8") == held.nbytes("uint8")
    # logits follow subsets and concatenations; a buffer without them cannot join one with them
    part = held.subset([1, 4])
    assert torch.equal(part.logits, held.logits[[1, 4]])
    assert torch.equal(SyntheticBuffer.concat([part, held.subset([0])]).logits, held.logits[[1, 4, 0]])
    with pytest.raises(BufferFormatError, match="with and without held logits"):
        SyntheticBuffer.concat([held, buf])


def test_bad_logits_are_refused():
    buf = make_buffer()
    with pytest.raises(ValueError, match=r"logits must be \[6, 3\]"):
        buf.with_logits(torch.zeros(6, 4))
    with pytest.raises(ValueError, match="NaN or inf"):
        buf.with_logits(torch.full((6, 3), float("inf")))
    with pytest.raises(BufferFormatError, match=r"logits must be float32 \[6, 3\]"):
        SyntheticBuffer(buf.images, buf.labels, 3, buf.class_ids, dict(META), torch.zeros(6, 2))


def test_logits_without_their_scales_are_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from replaykit.buffer import _tensor_digest

    buf = make_buffer()
    path = buf.with_logits(torch.randn(6, 3)).save(tmp_path / "buf.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "logit_scales"}
    header = json.loads(meta["replaykit"])
    header["sha256"] = _tensor_digest(tensors)  # a consistent file, just incomplete
    save_file(tensors, str(path), metadata={"replaykit": json.dumps(header)})
    with pytest.raises(BufferFormatError, match="float16 \\[N\\] scales"):
        SyntheticBuffer.load(path)


def test_loaded_buffer_does_not_change_when_its_file_is_rewritten_in_place(tmp_path):
    """Regression (fuzzing, issue 25): the loaded labels and class ids were views of safetensors' memory map of the
    file, so rewriting the file in place (cp over it, a downloader) changed a buffer already in memory."""
    path = make_buffer(soft=True).save(tmp_path / "buf.safetensors")
    loaded = SyntheticBuffer.load(path)
    labels, ids = loaded.labels.clone(), loaded.class_ids.clone()
    path.write_bytes(path.read_bytes()[:8] + b"A" * (path.stat().st_size - 8))  # same inode, other bytes
    assert torch.equal(loaded.labels, labels) and torch.equal(loaded.class_ids, ids)
