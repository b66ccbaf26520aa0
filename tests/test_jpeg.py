"""The JPEG codec (Pillow): shared headers, body splitting, errors, and its torch-free core."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from replaykit import jpeg


def _pixels(n: int, channels: int, size: int = 28, seed: int = 0) -> np.ndarray:
    """Smooth random images (blocky noise upsampled), like small natural images rather than white noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, channels, size // 4, size // 4))
    return (np.kron(coarse, np.ones((1, 1, 4, 4))) * 255).round().astype(np.uint8)


@pytest.mark.parametrize("channels", [1, 3])
def test_bodies_share_one_header_and_split_back_from_their_concatenation(channels):
    pixels = _pixels(12, channels)
    header, bodies = jpeg.encode_arrays(pixels, quality=75)
    assert header[:2] == b"\xff\xd8" and len(header) == jpeg.header_length(header + bodies[0])
    assert all(b.endswith(b"\xff\xd9") for b in bodies)
    assert jpeg.split_body_arrays(b"".join(bodies)) == bodies
    decoded = jpeg.decode_arrays(header, bodies, channels)
    assert decoded.shape == pixels.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - pixels).mean() < 20  # lossy, but the same pictures
    # a second call with the header given reuses it; the torch wrappers give the same codes and pixels
    again, more = jpeg.encode_arrays(pixels[:3], 75, header)
    assert again == header and more == bodies[:3]
    t_header, t_bodies = jpeg.encode(torch.from_numpy(pixels), 75)
    assert bytes(t_header.numpy()) == header and [bytes(b.numpy()) for b in t_bodies] == bodies
    assert torch.equal(jpeg.decode(t_header, t_bodies, channels), torch.from_numpy(decoded))


def test_lower_quality_stores_fewer_bytes():
    pixels = _pixels(20, 1, seed=1)
    sizes = [sum(map(len, jpeg.encode_arrays(pixels, q)[1])) for q in (2, 10, 50, 90)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1] / 2


def test_bad_codes_and_inputs_are_named_errors():
    header, bodies = jpeg.encode_arrays(_pixels(2, 1), 50)
    with pytest.raises(jpeg.JpegError, match="image 1 does not decode"):
        jpeg.decode_arrays(header, [bodies[0], bodies[1][: len(bodies[1]) // 2]], 1)
    with pytest.raises(jpeg.JpegError, match="decodes as L, expected RGB"):
        jpeg.decode_arrays(header, bodies, 3)
    with pytest.raises(jpeg.JpegError, match="after the last JPEG body"):
        jpeg.split_body_arrays(b"".join(bodies) + b"\x00\x01")
    with pytest.raises(jpeg.JpegError, match="no start-of-scan"):
        jpeg.header_length(b"\xff\xd8\x00\x00")
    with pytest.raises(ValueError, match="uint8"):
        jpeg.encode_arrays(np.zeros((1, 1, 8, 8), np.float32), 50)
    with pytest.raises(ValueError, match="quality"):
        jpeg.encode_arrays(np.zeros((1, 1, 8, 8), np.uint8), 0)
    with pytest.raises(jpeg.JpegError, match="1 \\(grey\\) or 3 \\(RGB\\)"):
        jpeg.encode_arrays(np.zeros((1, 2, 8, 8), np.uint8), 50)
    with pytest.raises(RuntimeError, match="headers that differ"):
        jpeg.encode_arrays(_pixels(1, 1), 50, header=jpeg.encode_arrays(_pixels(1, 1), 10)[0])


def test_the_core_needs_no_torch(tmp_path):
    """The device decodes bundle codes with these functions, in a process where torch cannot be imported."""
    pixels = _pixels(4, 1)
    header, bodies = jpeg.encode_arrays(pixels, 2)
    (tmp_path / "codes.bin").write_bytes(header + b"".join(bodies))
    np.save(tmp_path / "want.npy", jpeg.decode(*jpeg.encode(torch.from_numpy(pixels), 2), 1).numpy())
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked")
sys.meta_path.insert(0, Block())
import numpy as np
from replaykit import jpeg
data = open({str(tmp_path / 'codes.bin')!r}, "rb").read()
n = jpeg.header_length(data)
got = jpeg.decode_arrays(data[:n], jpeg.split_body_arrays(data[n:]), 1)
assert (got == np.load({str(tmp_path / 'want.npy')!r})).all()
assert "torch" not in sys.modules
print("ok")
"""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
