"""Letterboxing for the safety classifier: pad to a square (bottom and right, black), then resize to `side`.

The resize is OpenCV's 8-bit bilinear (`cv2.resize`, INTER_LINEAR: half-pixel centres, 11-bit fixed-point
weights, its rounding), re-implemented in numpy so that the classifier sees exactly what the detector's own
package feeds it, without OpenCV in the served stack. Only numpy: the BLS and the tests share it.
"""

from __future__ import annotations

import numpy as np

_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS
_COEF_SCALE = 1 << _COEF_BITS


def _taps(source: int, target: int, clamp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and fixed-point weights of each output position along one axis. OpenCV clamps the first and
    last columns' positions but not the rows' (rows outside the image repeat the edge row with the weights kept)."""
    scale = 1.0 / (np.float64(target) / np.float64(source))
    position = ((np.arange(target, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(position).astype(np.int64)
    fraction = (position - first.astype(np.float32)).astype(np.float32)
    if clamp:
        low, high = first < 0, first >= source - 1
        fraction[low | high] = 0
        first[low], first[high] = 0, source - 1
    w0 = np.rint((np.float32(1) - fraction) * _COEF_SCALE).astype(np.int64)
    w1 = np.rint(fraction * _COEF_SCALE).astype(np.int64)
    return np.clip(first, 0, source - 1), np.clip(first + 1, 0, source - 1), w0, w1


def resize_bilinear(image: np.ndarray, side: int) -> np.ndarray:
    """uint8 HWC -> uint8 [side, side, C], bit for bit as OpenCV's vectorised 8-bit INTER_LINEAR."""
    height, width = image.shape[:2]
    y0, y1, b0, b1 = _taps(height, side, clamp=False)
    x0, x1, a0, a1 = _taps(width, side, clamp=True)
    pixels = image.astype(np.int64)
    rows = pixels[:, x0] * a0[None, :, None] + pixels[:, x1] * a1[None, :, None]
    # OpenCV's vertical pass: (rows >> 4) * beta, high 16 bits, summed, then a rounding shift by 2.
    top = ((rows[y0] >> 4) * b0[:, None, None]) >> 16
    bottom = ((rows[y1] >> 4) * b1[:, None, None]) >> 16
    resized: np.ndarray = np.clip((top + bottom + 2) >> 2, 0, 255).astype(np.uint8)
    return resized


def letterbox(image: np.ndarray, side: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [side, side, 3]: zero-padded to max(H, W) square at the bottom and right, resized."""
    height, width = image.shape[:2]
    square = max(height, width)
    padded = np.zeros((square, square, image.shape[2]), dtype=np.uint8)
    padded[:height, :width] = image
    return padded if square == side else resize_bilinear(padded, side)
