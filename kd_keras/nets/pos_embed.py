"""Resizing a ViT's learned positional embeddings to another grid, as each source does it.

The sources differ, and a converted teacher must match the one its checkpoint came from:

  "dino"     DINO's and DINOv2's (hub) interpolate_pos_encoding: torch bicubic with a scale
             factor (g + 0.1) / M instead of an output size (the "+0.1" kludge of DINO issue
             #8), no antialias.
  "size"     Hugging Face's Dinov2Model / ViTModel: bicubic to the output size, no antialias.
  "size_aa"  timm's resample_abs_pos_embed (and HF's Dinov2WithRegisters): bicubic to the
             output size with antialias=True.

`torch_bicubic` is a NumPy re-derivation of torch's `F.interpolate(mode="bicubic",
align_corners=False)`: without antialias, Keys' cubic convolution with a = -0.75 on the 4
nearest samples, source coordinate (i + 0.5) * scale - 0.5, edge samples repeated; with
antialias (only different when shrinking), a cubic filter with a = -0.5 (Pillow's) stretched
by the scale, weights normalised to sum to one. Computed in float64, returned as float32.
"""

import math

import numpy as np

RESIZE_METHODS = ("dino", "size", "size_aa")
DINO_OFFSET = 0.1


def _cubic(x, a):
    """Keys' cubic convolution kernel at distances x (array), parameter a."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _plain_weights(in_size, out_size, scale):
    """[out, in] interpolation matrix of torch's bicubic without antialias.

    scale: input / output step (torch uses 1 / scale_factor when a scale factor is given).
    """
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        real = (i + 0.5) * scale - 0.5
        base = min(math.floor(real), in_size - 1)
        t = min(max(real - base, 0.0), 1.0)
        taps = _cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)
        for j, w in enumerate(taps):
            matrix[i, min(max(base - 1 + j, 0), in_size - 1)] += w
    return matrix


def _antialias_weights(in_size, out_size, scale):
    """[out, in] matrix of torch's antialiased bicubic (the filter widens when shrinking)."""
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = scale * (i + 0.5)
        # int() truncates towards zero, as the C++ static_cast does.
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = _cubic((np.arange(lo, hi) - center + 0.5) * inv, -0.5)
        total = taps.sum()
        matrix[i, lo:hi] = taps / total if total != 0 else taps
    return matrix


def torch_bicubic(grid, out_size, scale_factor=None, antialias=False):
    """torch's F.interpolate(x, mode="bicubic", align_corners=False) on a [H, W, C] array.

    Args:
      grid: float array [H, W, C] (channels last; torch's [1, C, H, W] transposed).
      out_size: (H', W').
      scale_factor: (sh, sw) or None; given, torch maps coordinates with 1 / scale_factor
        rather than H / H' (DINO's interpolate_pos_encoding passes one).
      antialias: torch's antialias flag.
    Returns:
      float32 [H', W', C].
    """
    grid = np.asarray(grid, np.float64)
    rows = []
    for axis in range(2):
        n_in, n_out = grid.shape[axis], int(out_size[axis])
        scale = 1.0 / scale_factor[axis] if scale_factor else n_in / n_out
        if antialias:
            rows.append(_antialias_weights(n_in, n_out, scale))
        else:
            rows.append(_plain_weights(n_in, n_out, scale))
    out = np.einsum("ih,jw,hwc->ijc", rows[0], rows[1], grid)
    return out.astype(np.float32)


def resize_pos_embed(pos_embed, grid, method, class_pos=True):
    """Positional embeddings [1, P, D] of a square grid resized to a grid x grid one.

    class_pos: the first row belongs to the class token and is kept as it is.
    method: one of RESIZE_METHODS. Returns the input unchanged when the grid already fits, as
    every source does.
    Returns:
      float32 [1, grid * grid + class_pos, D].
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"positional-embedding resize must be one of {RESIZE_METHODS}.")
    pos_embed = np.asarray(pos_embed, np.float32)
    prefix, patches = pos_embed[:, : int(class_pos)], pos_embed[:, int(class_pos) :]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(f"{patches.shape[1]} positional embeddings are not a square grid")
    if side == grid:
        return pos_embed
    patches = patches[0].reshape(side, side, -1)
    if method == "dino":
        factor = (grid + DINO_OFFSET) / side
        out_side = math.floor(side * factor)
        if out_side != grid:  # DINO asserts this too
            raise ValueError(f"DINO's resize of a {side}-grid gives {out_side}, not {grid}")
        resized = torch_bicubic(patches, (grid, grid), scale_factor=(factor, factor))
    else:
        resized = torch_bicubic(patches, (grid, grid), antialias=method == "size_aa")
    return np.concatenate([prefix, resized.reshape(1, grid * grid, -1)], axis=1)
