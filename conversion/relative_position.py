"""Resizing Swin relative-position-bias tables with the official X-VLM algorithm.

The official loader (`interpolate_relative_pos_embed` in `models/swin_transformer.py`, taken from BEiT) resizes a
table `[(2w-1)^2, heads]` for a new window `w'` when a 224/window-7 pre-training checkpoint is fine-tuned at 384
(window 12) or 480 (window 15). Its semantics, reproduced here:

1. `src = sqrt(rows)`, `dst = 2w'-1`. Equal sizes: the table is returned unchanged.
2. A ratio `q` is found by bisection on `[1.01, 1.5]` (stop when the interval is <= 1e-6; `q` is the *last midpoint*
   computed in the loop) so that `1 + q + ... + q^(src//2 - 1)` is about `dst//2`.
3. The source values are placed on a geometric grid `x = [-dis[::-1], 0, dis]` with `dis = [1, 1+q, 1+q+q^2, ...]`
   (`src//2` terms); the targets are the integer offsets `-dst//2 .. dst//2`.
4. Each head's `[src, src]` slice (rows = relative dh, columns = relative dw) is interpolated with SciPy's
   `interp2d(kind='cubic')`, i.e. FITPACK's s=0 bicubic tensor-product spline, evaluated with targets outside the
   source grid clamped to its edge (FITPACK's `bispev` clamps). The result is float32.

`interp2d` no longer exists (SciPy >= 1.14). With `s=0` and cubic degree, FITPACK places the interior knots at the
data points except the second and the second-to-last, which is exactly the *not-a-knot* interpolating cubic spline.
On a rectangular grid the tensor-product interpolant is separable, so the 2-D result is `W @ Z @ W.T` with `W` the
`[dst, src]` matrix of the 1-D not-a-knot spline operator (evaluation at the clamped targets). This module builds `W`
in float64 with NumPy only (no SciPy dependency); the tests check it against
`scipy.interpolate.RectBivariateSpline(x, x, z, kx=3, ky=3, s=0)` (the documented `interp2d` replacement).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "bisect_ratio",
    "interpolate_relative_position_bias_table",
    "not_a_knot_spline_matrix",
    "source_grid",
    "window_from_table",
]


def window_from_table(num_rows: int) -> int:
    """The window `w` of a table with `(2w-1)^2` rows; raises if `num_rows` is not such a square."""
    side = int(round(math.sqrt(num_rows)))
    if side * side != num_rows or side % 2 != 1:
        raise ValueError(
            f"A relative position bias table has (2*window-1)^2 rows; {num_rows} rows is not the square of an odd "
            "number."
        )
    return (side + 1) // 2


def bisect_ratio(src_size: int, dst_size: int) -> float:
    """The official bisection for the geometric ratio `q` (returns the last midpoint computed in the loop)."""
    left, right = 1.01, 1.5
    q = (left + right) / 2.0
    while right - left > 1e-6:
        q = (left + right) / 2.0
        gp = (1.0 - q ** (src_size // 2)) / (1.0 - q)
        if gp > dst_size // 2:
            right = q
        else:
            left = q
    return q


def source_grid(src_size: int, dst_size: int) -> np.ndarray:
    """Positions of the `src_size` source rows/columns on the official geometric grid (float64)."""
    q = bisect_ratio(src_size, dst_size)
    dis = []
    cur = 1.0
    for i in range(src_size // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return np.asarray([-d for d in reversed(dis)] + [0.0] + dis, dtype=np.float64)


def target_grid(dst_size: int) -> np.ndarray:
    """The official target positions `arange(-t, t + 0.1, 1.0)` with `t = dst_size // 2`."""
    t = dst_size // 2
    return np.arange(-t, t + 0.1, 1.0, dtype=np.float64)


def not_a_knot_spline_matrix(x: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Matrix `W` `[len(targets), len(x)]` with `W @ y` = the not-a-knot cubic spline through `(x, y)` at `targets`.

    Targets outside `[x[0], x[-1]]` are clamped to the end points (as FITPACK's evaluator does). Needs at least
    4 strictly increasing points (FITPACK's requirement for a cubic interpolating spline).
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if n < 4:
        raise ValueError(
            f"A cubic interpolating spline needs at least 4 source points, got {n} (a window of "
            f"{(n + 1) // 2} is too small for the official bicubic resizing)."
        )
    h = np.diff(x)
    if not np.all(h > 0):
        raise ValueError("The source grid must be strictly increasing.")

    # Second derivatives M solve A @ M = R @ y.
    a = np.zeros((n, n))
    r = np.zeros((n, n))
    # Not-a-knot at x[1]: the third derivative is continuous, (M1 - M0) / h0 = (M2 - M1) / h1.
    a[0, 0], a[0, 1], a[0, 2] = -h[1], h[0] + h[1], -h[0]
    for i in range(1, n - 1):
        a[i, i - 1] = h[i - 1]
        a[i, i] = 2.0 * (h[i - 1] + h[i])
        a[i, i + 1] = h[i]
        r[i, i - 1] = 6.0 / h[i - 1]
        r[i, i] = -6.0 / h[i - 1] - 6.0 / h[i]
        r[i, i + 1] = 6.0 / h[i]
    # Not-a-knot at x[n-2].
    a[n - 1, n - 3], a[n - 1, n - 2], a[n - 1, n - 1] = -h[n - 2], h[n - 3] + h[n - 2], -h[n - 3]
    second = np.linalg.solve(a, r)  # [n, n]: M = second @ y

    t = np.clip(np.asarray(targets, dtype=np.float64), x[0], x[-1])
    idx = np.clip(np.searchsorted(x, t, side="right") - 1, 0, n - 2)
    hi = h[idx]
    wa = (x[idx + 1] - t) / hi
    wb = (t - x[idx]) / hi
    rows = np.arange(t.shape[0])
    weights = np.zeros((t.shape[0], n))
    weights[rows, idx] += wa
    weights[rows, idx + 1] += wb
    weights += ((wa**3 - wa) * hi**2 / 6.0)[:, None] * second[idx]
    weights += ((wb**3 - wb) * hi**2 / 6.0)[:, None] * second[idx + 1]
    return weights


def interpolate_relative_position_bias_table(table: torch.Tensor, dst_window: int) -> torch.Tensor:
    """Resize a Swin table `[(2w-1)^2, heads]` to `[(2*dst_window-1)^2, heads]` with the official semantics.

    Returns the input unchanged when the size does not change (as the official loader). Otherwise the result is
    float32 (the official code builds it with `torch.Tensor`). Meta tensors give a meta result of the right shape.
    """
    if table.dim() != 2:
        raise ValueError(f"Expected a [(2w-1)^2, heads] table, got shape {tuple(table.shape)}.")
    src_rows, heads = table.shape
    src_size = 2 * window_from_table(src_rows) - 1
    dst_size = 2 * int(dst_window) - 1
    if src_size == dst_size:
        return table
    if table.device.type == "meta":
        return torch.empty((dst_size * dst_size, heads), dtype=torch.float32, device="meta")
    weights = not_a_knot_spline_matrix(source_grid(src_size, dst_size), target_grid(dst_size))
    values = table.detach().to(device="cpu", dtype=torch.float32).numpy().astype(np.float64)
    grids = values.T.reshape(heads, src_size, src_size)  # per head: rows = dh, columns = dw
    out = np.einsum("ai,hij,bj->hab", weights, grids, weights)  # W @ Z @ W.T for every head
    out = out.reshape(heads, dst_size * dst_size).T
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(table.device)
