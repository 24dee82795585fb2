"""TensorBoard scalars and image grids, and PNG files of the same grids."""
import numpy as np
import tensorflow as tf


def to_uint8(images):
    """`[..., H, W, C]` float in [-1, 1] -> uint8 in [0, 255]."""
    images = np.asarray(images, dtype=np.float32)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(rows, pad=2):
    """A list of R batches `[N, H, W, C]` in [-1, 1] -> one uint8 image `[R*(H+pad)+pad, N*(W+pad)+pad, C]`."""
    rows = [to_uint8(r) for r in rows]
    n, h, w, c = rows[0].shape
    grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, c), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = img
    return grid


def write_png(path, grid):
    """Writes a uint8 `[H, W, C]` image as PNG (C = 1 or 3)."""
    tf.io.write_file(str(path), tf.io.encode_png(grid))


def write_scalars(writer, step, scalars):
    """Writes {name: float} at `step` to a tf.summary writer."""
    with writer.as_default(step=step):
        for name, value in scalars.items():
            tf.summary.scalar(name, value)
