import pytest
import torch
from PIL import Image

from replaykit.buffer import SyntheticBuffer
from replaykit.viz import save_accuracy_plot, save_buffer_grid


def _png_size(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_buffer_grid_has_one_row_per_class(tmp_path):
    ids = torch.tensor([0, 0, 0, 3, 3, 3])
    buf = SyntheticBuffer(torch.randn(6, 1, 8, 8), ids, 4, meta={"mean": [0.5], "std": [0.25], "dataset": "digits"})
    two = _png_size(save_buffer_grid(buf, tmp_path / "two.png"))
    three = _png_size(save_buffer_grid(SyntheticBuffer.concat([buf, buf.subset([0]).select_classes([0])]), tmp_path / "a.png"))
    four_rows = SyntheticBuffer(torch.randn(4, 3, 8, 8), torch.arange(4), 4, meta={"mean": [0.5] * 3, "std": [0.25] * 3})
    rows4 = _png_size(save_buffer_grid(four_rows, tmp_path / "four.png"))
    assert three[0] > two[0]  # a fourth column for class 0
    assert rows4[1] > two[1]  # four rows are taller than two
    with pytest.raises(ValueError, match="empty"):
        save_buffer_grid(SyntheticBuffer.empty((1, 8, 8), 4), tmp_path / "e.png")


def test_accuracy_plot_written_atomically(tmp_path):
    path = save_accuracy_plot({"naive": [99, 50, 33], "replay": [99, 80, 70]}, tmp_path / "acc.png", errors={"replay": [1, 2, 3]})
    assert _png_size(path)[0] > 100
    assert [p.name for p in tmp_path.iterdir()] == ["acc.png"]
    with pytest.raises(ValueError, match="no curves"):
        save_accuracy_plot({}, tmp_path / "none.png")
