"""TensorBoard scalars and image grids, and PNG files of the same grids.

`sample_grid` is the one readable grid of samples (one labelled block per NFE, upscaled) that samples.png,
TensorBoard and `python -m trainers.generate` show.
"""
import math

import numpy as np
import tensorflow as tf

MIN_WIDTH = 512  # px: `sample_grid` upscales until the grid is at least this wide
MIN_IMAGE = 48  # px: ... and until every image is at least this large
MAX_COLUMNS = 16  # images per line of a `sample_grid` block, by default


def to_uint8(images):
    """`[..., H, W, C]` float in [-1, 1] -> uint8 in [0, 255]."""
    images = np.asarray(images, dtype=np.float32)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable built-in font
    except TypeError:
        return ImageFont.load_default()


def _label_text(label):
    return f"NFE {label}" if isinstance(label, (int, np.integer)) else str(label)


def sample_grid(rows, nfes, scale=None, columns=None, pad=2, min_width=MIN_WIDTH, min_image=MIN_IMAGE):
    """Rows of samples -> one readable uint8 image `[H', W', C]`: a block per row with its label on the left.

    rows: R batches `[N, H, W, C]` float in [-1, 1] (a list, or an array `[R, N, H, W, C]`); C = 1 or 3.
    nfes: R labels, one per row: an int n is written "NFE n", anything else as str().
    columns: images per line of a block (default min(N, MAX_COLUMNS)); a block of N images has
    ceil(N / columns) lines. scale: integer nearest-neighbour upscaling of the images and of `pad` (None: the
    smallest scale >= 1 that makes the grid at least `min_width` px wide and every image at least `min_image` px
    high and wide). Blocks are separated by white space
    and labelled in black on the white margin, with a font sized to the scaled image height.
    """
    from PIL import Image, ImageDraw

    rows = [to_uint8(r) for r in rows]
    if not rows or len(rows) != len(nfes):
        raise ValueError(f"sample_grid needs one label per row; got {len(rows)} row(s) and {len(nfes)} label(s)")
    n, h, w, c = rows[0].shape
    if c not in (1, 3) or any(r.shape != rows[0].shape for r in rows):
        raise ValueError(f"rows must all have shape [N, H, W, 1 or 3]; got {[r.shape for r in rows]}")
    columns = min(n, columns or MAX_COLUMNS)
    lines = math.ceil(n / columns)
    texts = [_label_text(x) for x in nfes]

    def layout(s):
        font = _font(max(10, min(40, round(0.4 * h * s))))
        text_w = max(ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), t, font=font)[2] for t in texts)
        p = pad * s
        label_w = text_w + 2 * p + 4 * s
        return font, p, label_w, label_w + columns * (w * s + p) + p

    if scale is None:
        scale = max(1, math.ceil(min_image / min(h, w)))
        while layout(scale)[3] < min_width:
            scale += 1
    if scale < 1 or int(scale) != scale:
        raise ValueError(f"scale={scale} must be a positive integer")
    scale = int(scale)
    font, p, label_w, width = layout(scale)
    cell_h, cell_w = h * scale + p, w * scale + p
    block_h = lines * cell_h
    gap = 3 * p  # between blocks, beyond the images' own padding
    height = len(rows) * block_h + (len(rows) - 1) * gap + p
    grid = np.full((height, width, c), 255, np.uint8)
    tops = []
    for i, row in enumerate(rows):
        top = p + i * (block_h + gap)
        tops.append(top)
        big = row.repeat(scale, axis=1).repeat(scale, axis=2)
        for j, img in enumerate(big):
            y, x = top + (j // columns) * cell_h, label_w + (j % columns) * cell_w
            grid[y:y + h * scale, x:x + w * scale] = img
    canvas = Image.fromarray(grid[..., 0] if c == 1 else grid)
    draw = ImageDraw.Draw(canvas)
    for text, top in zip(texts, tops):
        draw.text((p, top + (block_h - p) / 2), text, fill=0 if c == 1 else (0, 0, 0), font=font, anchor="lm")
    out = np.asarray(canvas, np.uint8)
    return out[..., None] if c == 1 else out


def write_png(path, grid):
    """Writes a uint8 `[H, W, C]` image as PNG (C = 1 or 3)."""
    tf.io.write_file(str(path), tf.io.encode_png(grid))


def write_scalars(writer, step, scalars):
    """Writes {name: float} at `step` to a tf.summary writer."""
    with writer.as_default(step=step):
        for name, value in scalars.items():
            tf.summary.scalar(name, value)


def flatten(config, prefix=""):
    """{"a.b": value} of a nested dict; lists as strings (hparams take bool, int, float and str)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (bool, int, float, str)):
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


def write_config(writer, config: dict, step=0):
    """The run's resolved configuration (config.json) to TensorBoard: the HParams dashboard (flattened keys,
    e.g. `objective.order`) and the Text dashboard (the JSON itself)."""
    import json

    from tensorboard.plugins.hparams import api as hp
    with writer.as_default(step=step):
        hp.hparams(flatten(config), trial_id=config.get("trainer", "run"))
        tf.summary.text("config", "```\n" + json.dumps(config, indent=1, sort_keys=True) + "\n```", step=step)
