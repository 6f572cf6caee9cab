"""Derives the Winograd F(m x m, r x r) matrices of src/ops/conv/winograd.rs and measures their
float32 rounding error on a conv2-like layer.

For interpolation points p_0..p_{a-2} and infinity (a = m + r - 1), with the Toom-Cook
construction: G evaluates the filter at the points (scaled by the Lagrange denominators), A^T
evaluates the output polynomial, B^T holds the coefficients of prod_{j != i}(x - p_j) (and of
the full product for the point at infinity). Rows of B^T and columns of A^T are then scaled to
integers, the scales moved into G. Prints the matrices, then the error of every point set tried
(the largest |y - exact| over the largest |exact|, inputs as after a ReLU, 64 channels).

    python3 scripts/winograd_matrices.py          # needs numpy only
"""
import itertools
from fractions import Fraction as Fr
from math import lcm

import numpy as np


def poly_from_roots(roots):
    poly = [Fr(1)]
    for root in roots:
        poly = [(poly[k - 1] if k > 0 else 0) - root * (poly[k] if k < len(poly) else 0) for k in range(len(poly) + 1)]
    return poly


def matrices(m, r, points):
    a = m + r - 1
    p = [Fr(v) for v in points]
    assert len(p) == a - 1
    norm = [1 / np.prod([pi - pj for j, pj in enumerate(p) if j != i], dtype=object) for i, pi in enumerate(p)]
    g = [[norm[i] * p[i] ** j for j in range(r)] for i in range(a - 1)] + [[Fr(0)] * (r - 1) + [Fr(1)]]
    at = [[p[i] ** j for i in range(a - 1)] + [Fr(int(j == m - 1))] for j in range(m)]
    bt = [poly_from_roots([pj for j, pj in enumerate(p) if j != i]) + [Fr(0)] for i in range(a - 1)]
    bt.append(poly_from_roots(p))
    for i in range(a):
        s = lcm(*[v.denominator for v in bt[i]])
        bt[i] = [v * s for v in bt[i]]
        g[i] = [v / s for v in g[i]]
        s = lcm(*[at[j][i].denominator for j in range(m)])
        for j in range(m):
            at[j][i] *= s
        g[i] = [v / s for v in g[i]]
    return bt, g, at


def rounding_error(m, r, points, channels=64, outputs=16, size=26, seed=1):
    bt, g, at = (np.array(x, dtype=np.float64) for x in matrices(m, r, points))
    bt32, at32 = bt.astype(np.float32), at.astype(np.float32)
    a, tiles = m + r - 1, size // m
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.standard_normal((channels, size + r - 1, size + r - 1)), 0).astype(np.float32)
    w = (rng.standard_normal((outputs, channels, r, r)) * 0.05).astype(np.float32)
    u = np.einsum("ij,ocjk,lk->ilco", g, w.astype(np.float64), g).astype(np.float32)
    starts = np.arange(tiles) * m
    d = np.stack([np.stack([x[:, i : i + a, j : j + a] for j in starts], 1) for i in starts], 1)
    v = np.einsum("ij,cyxjk,lk->ilcyx", bt32, d, bt32).astype(np.float32)
    prod = np.einsum("ilcyx,ilco->ilyxo", v, u).astype(np.float32)
    y = np.einsum("ji,ilyxo,kl->oyjxk", at32, prod, at32).astype(np.float32).reshape(outputs, size, size)
    exact = np.zeros((outputs, size, size))
    for ky, kx in itertools.product(range(r), range(r)):
        exact += np.einsum("oc,chw->ohw", w[:, :, ky, kx].astype(np.float64), x[:, ky : ky + size, kx : kx + size])
    return np.abs(y - exact).max() / np.abs(exact).max()


def show(name, rows):
    print(f"  {name}:")
    for row in rows:
        print("   ", " ".join(f"{str(v):>6}" for v in row))


if __name__ == "__main__":
    for m, r, points in [(2, 3, [0, 1, -1]), (2, 5, [0, 1, -1, 2, Fr(-1, 2)])]:
        print(f"F({m}x{m}, {r}x{r}) at {', '.join(map(str, points))}:")
        for name, rows in zip(["B^T", "G", "A^T"], matrices(m, r, points)):
            show(name, rows)
    print("F(2x2, 5x5) rounding error (mean of 2 seeds) by interpolation points:")
    for points in [[0, 1, -1, 2, -2], [0, 1, -1, Fr(1, 2), Fr(-1, 2)], [0, 1, -1, Fr(1, 2), -2], [0, 1, -1, 2, Fr(-1, 2)]]:
        error = np.mean([rounding_error(2, 5, points, seed=s) for s in range(2)])
        print(f"  {', '.join(map(str, points)):<22} {error:.2e}")
