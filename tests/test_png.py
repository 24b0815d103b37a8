"""The PNG encoder of distilled images: lossless, readable by PIL, deterministic."""

import io

import numpy as np
import pytest
from PIL import Image

from rded_fast.png import encode_png


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 5, 3), (64, 33, 3), (224, 224, 3), (9, 4), (16, 16, 1)])
def test_png_round_trips_through_pil(shape):
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    with Image.open(io.BytesIO(encode_png(pixels))) as im:
        im.load()
        back = np.array(im)
    assert back.shape[:2] == pixels.shape[:2] and back.size == pixels.size
    assert np.array_equal(back.reshape(pixels.shape), pixels)


def test_png_is_deterministic_and_level_trades_size():
    y, x = np.mgrid[0:96, 0:96]
    pixels = np.stack([(x * 2) % 256, (y * 3) % 256, (x + y) % 256], -1).astype(np.uint8)
    assert encode_png(pixels) == encode_png(pixels.copy())
    assert len(encode_png(pixels, level=9)) < len(encode_png(pixels, level=0))


def test_png_rejects_what_it_cannot_write():
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="channels"):
        encode_png(np.zeros((4, 4, 4), np.uint8))
