"""Image helpers: [-1, 1] floats to uint8 and PNG grids."""

from __future__ import annotations

import os

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[N, H, W, C] in [-1, 1] -> uint8 [N, H, W, C] (LlamaGen's (x + 1) * 127.5, clipped)."""
    x = (np.asarray(images, np.float32) + 1.0) * 127.5
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def save_image_uint8(images: np.ndarray) -> np.ndarray:
    """[N, H, W, C] in [-1, 1] -> uint8 exactly as torchvision's `save_image((x + 1) / 2)`
    writes a PNG (floor(255 x + 0.5), clamped), the quantisation the official DD scripts
    compute FID on."""
    x = (np.asarray(images, np.float32) + 1.0) / 2.0
    return np.clip(np.floor(x * 255.0 + 0.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows*(H+pad)+pad, nrow*(W+pad)+pad, C] image."""
    n, h, w, c = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h,
             pad + col * (w + pad): pad + col * (w + pad) + w] = images[i]
    return grid


def save_grid(path: str, images: np.ndarray, nrow: int | None = None, scale: int = 1) -> str:
    """Writes images ([-1, 1] floats or uint8, [N, H, W, C]) as a PNG grid; returns the path."""
    from PIL import Image

    imgs = images if images.dtype == np.uint8 else to_uint8(images)
    if scale > 1:
        imgs = imgs.repeat(scale, axis=1).repeat(scale, axis=2)
    grid = make_grid(imgs, nrow)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)
    return path
