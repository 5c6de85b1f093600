"""Linear centred kernel alignment (CKA) between two sets of activations.

SAFE scores an adapter unit by how far the block's output with adapters (X) has moved from the same
block's output without them (Y): importance = 1 - CKA(X, Y). Rows are tokens, columns are features.

Pure module: imports torch and the standard library only.
"""

from __future__ import annotations

import math

import torch

__all__ = ["CKA_PRECISIONS", "SCORING_SITES", "CKAAccumulator", "NonFiniteActivations", "importance_by_difference",
           "importance_from_cka", "linear_cka"]

#: Where SAFE measures 1 - CKA (see peft_safe.safe.method.scoring): a block's output, its residual update, or each
#: adapted layer's output, each with vs without the adapters.
SCORING_SITES = ("block_output", "residual_update", "adapter_output")

_FLOAT64_EPS = torch.finfo(torch.float64).eps


class NonFiniteActivations(ValueError):
    """An input to CKA holds inf or NaN (checked once, where the values are read for the products)."""


#: 1 - CKA below this is float64 rounding of identical representations, not a difference between them.
ROUNDING_TOLERANCE = 1e-10

def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"linear_cka expects two torch.Tensor, got {type(x).__name__} and {type(y).__name__}")
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(
            f"linear_cka expects 2-D inputs [n, d]; got x of shape {tuple(x.shape)} and y of shape {tuple(y.shape)}"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            "linear_cka needs the same number of rows (tokens) in x and y; got x of shape "
            f"{tuple(x.shape)} and y of shape {tuple(y.shape)}"
        )
    if x.is_complex() or y.is_complex():
        raise TypeError(f"linear_cka expects real tensors, got dtypes {x.dtype} and {y.dtype}")


def _centred_unit_scale(m: torch.Tensor) -> torch.Tensor | None:
    """Centres the columns of `m` in float64 and scales it to max-abs 1; None when it is (numerically) zero.

    Scaling by a positive constant leaves CKA unchanged, so dividing by the max-abs is exact and keeps
    every product below in a safe range whatever the magnitude of the input (1e-30 or 1e30).
    """
    m = m.detach()
    if m.device.type == "mps":  # no float64 on MPS
        m = m.cpu()
    if m.numel() == 0:
        return None
    if not torch.isfinite(m).all():
        raise NonFiniteActivations("linear_cka got non-finite values (inf or NaN) in its input")
    # One float64 copy, changed in place from here on; max |.| per column as max(amax, -amin), with no |m| copy.
    m = m.to(torch.float64, copy=True)
    col_scale = torch.maximum(m.amax(dim=0), m.amin(dim=0).neg())  # [d]
    top = col_scale.max()
    if top == 0:
        return None
    m.div_(top)
    col_scale = col_scale / top
    m.sub_(m.mean(dim=0, keepdim=True))
    # A constant column leaves rounding noise of order n * eps after centring: count it as zero.
    tol = 4 * max(m.shape[0], 1) * _FLOAT64_EPS
    centred_scale = torch.maximum(m.amax(dim=0), m.amin(dim=0).neg())
    dead = centred_scale <= tol * col_scale
    if dead.any():
        m[:, dead] = 0
        centred_scale = centred_scale.masked_fill(dead, 0)
    peak = centred_scale.max()
    if peak == 0:
        return None
    return m.div_(peak)


def _cka_feature(xc: torch.Tensor, yc: torch.Tensor) -> float:
    """d x d form: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F); cheap when tokens outnumber features."""
    cross = torch.linalg.matrix_norm(yc.T @ xc) ** 2
    return float(cross / (torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)))


def _cka_gram(xc: torch.Tensor, yc: torch.Tensor) -> float:
    """n x n form: <K, L>_F / (||K||_F ||L||_F) with K = X X^T, L = Y Y^T on centred X, Y."""
    k = xc @ xc.T
    l = yc @ yc.T  # noqa: E741
    return float((k * l).sum() / (torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l)))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two activation matrices whose rows are the same tokens.

    Columns are centred and everything is computed in float64. The d x d form is used when there are
    more tokens than features, the n x n form otherwise; both give the same value.

    Degenerate cases never give NaN: fewer than 2 rows, or both centred matrices zero, give 1.0
    (nothing changed); exactly one centred matrix zero gives 0.0.

    Args:
        x: Activations of shape [n, d1], any real dtype (fp16/bf16/fp32/fp64).
        y: Activations of shape [n, d2] on the same n tokens.

    Returns:
        The CKA similarity, clamped to [0, 1].

    Raises:
        TypeError: If x or y is not a real torch.Tensor.
        ValueError: If an input is not 2-D, the row counts differ, or a value is inf or NaN.

    Example:
        >>> x = torch.randn(64, 8)
        >>> round(linear_cka(x, 3.0 * x), 6)
        1.0
    """
    _check_pair(x, y)
    n = x.shape[0]
    if n < 2:
        return 1.0
    xc = _centred_unit_scale(x)
    yc = _centred_unit_scale(y)
    if xc is None and yc is None:
        return 1.0
    if xc is None or yc is None:
        return 0.0
    yc = yc.to(xc.device)
    if n > max(xc.shape[1], yc.shape[1]):
        value = _cka_feature(xc, yc)
    else:
        value = _cka_gram(xc, yc)
    return min(1.0, max(0.0, value))


#: ``CKAAccumulator.importance``'s ways of computing 1 - CKA: the float64 reference, or the difference form in float32.
CKA_PRECISIONS = ("float64", "float32")


def importance_by_difference(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - linear CKA(x, y) from ``y`` and the change ``d = x - y``, the products in float32.

    With A = YᵀY, B = YᵀD, C = DᵀD on centred Y and D (the n x n Gram form when tokens do not outnumber features),
    CKA = (1 + 2p + r) / sqrt(1 + 4p + 2q + s) with p = <A,B>/|A|², q = <A,C>/|A|², r = |B|²/|A|² and
    s = |B + Bᵀ + C|²/|A|², and 1 - CKA = (2q + s - 2r - (2p + r)²) / ((sqrt(1+u) + 1 + v) sqrt(1+u)), u = 4p + 2q
    + s, v = 2p + r: the first-order terms cancel in closed form, so float32 products lose precision relative to
    the change's own size, not to 1. A change larger than half of y (1 - CKA far from 0) goes to the float64 form,
    which then loses nothing. The float64 form subtracts a CKA near 1 from 1 and cannot resolve importances
    below about 1e-10 (:data:`ROUNDING_TOLERANCE`); this one agrees with it above that
    (tests/core/test_cka_difference.py states the tolerance) and goes on below it. The matrix products run in
    float32: twice float64's speed on a CPU, 64 times on consumer GPUs (a whole scoring gains less where the
    products do not dominate).

    Args:
        x: activations with the adapters, [n, d]; y: without them, [n, d] (same shape).

    Returns:
        1 - CKA in [0, 1]: 0 when nothing changed (or fewer than 2 rows), 1 when exactly one of x, y is constant.

    Raises:
        ValueError: for shapes that differ or non-finite values.
    """
    _check_pair(x, y)
    if x.shape != y.shape:
        raise ValueError(f"importance_by_difference needs x and y of one shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}; use linear_cka for different widths.")
    if x.shape[0] < 2:
        return 0.0
    work = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32  # bf16 / fp16 widened
    xw, yw = x.detach().to(work), y.detach().to(x.device, work)
    if not (torch.isfinite(xw).all() and torch.isfinite(yw).all()):
        raise NonFiniteActivations("importance_by_difference got non-finite values (inf or NaN) in its input")
    # the change taken before any rounding of its own; both scaled to max-abs 1 (CKA does not see a common scale)
    # before float32, so 1e-30 or 1e30 activations neither underflow nor overflow
    scale = torch.maximum(xw.abs().max(), yw.abs().max())
    if scale == 0:
        return 0.0
    d = ((xw - yw) / scale).to(torch.float32)
    y32 = (yw / scale).to(torch.float32)
    y32 = y32 - y32.mean(dim=0, keepdim=True)
    d = d - d.mean(dim=0, keepdim=True)
    change, still = float(d.double().square().sum()), float(y32.double().square().sum())
    if still == 0:  # y constant: CKA 0 unless x is too
        return 0.0 if change == 0 else 1.0
    if change > 0.25 * still:  # a change as large as half of y: far from CKA 1, the float64 form loses nothing
        return importance_from_cka(linear_cka(x, y))
    if x.shape[0] > x.shape[1]:  # d x d: A, B, C themselves
        a, b, c = ((m.T @ n).double() for m, n in ((y32, y32), (y32, d), (d, d)))
        a2, ab, ac, bb = (a * a).sum(), (a * b).sum(), (a * c).sum(), (b * b).sum()
        ss = ((b + b.T + c) ** 2).sum()
    else:  # n x n: K = YYᵀ, M = YDᵀ, L = DDᵀ give the same inner products
        k, m, l = ((p @ q.T).double() for p, q in ((y32, y32), (y32, d), (d, d)))  # noqa: E741
        a2, ab, ac, bb = (k * k).sum(), (k * m).sum(), (m * m).sum(), (k * l).sum()
        ss = 2 * bb + 2 * (m * m.T).sum() + 4 * (m * l).sum() + (l * l).sum()
    p, q, r, s = ab / a2, ac / a2, bb / a2, ss / a2
    u, v = 4 * p + 2 * q + s, 2 * p + r  # |D| <= |Y| / 2 keeps 1 + u = |XᵀX|² / |YᵀY|² above 1/16
    root = torch.sqrt(1 + u)
    value = float((2 * q + s - 2 * r - v * v) / ((root + 1 + v) * root))
    return min(1.0, max(0.0, value))


def importance_from_cka(cka: float) -> float:
    """SAFE's importance score of a unit: 1 - CKA, clamped to [0, 1].

    Args:
        cka: A CKA similarity.

    Returns:
        1 - cka, clamped to [0, 1]; below ``ROUNDING_TOLERANCE`` (float64 rounding of CKA(X, X)) it is 0.

    Raises:
        ValueError: If cka is NaN or infinite.
    """
    if not math.isfinite(cka):
        raise ValueError(f"importance_from_cka needs a finite CKA value, got {cka}")
    importance = min(1.0, max(0.0, 1.0 - cka))
    # Identical representations give CKA = 1 only up to float64 rounding; left as it is, that noise would become
    # the top unit once scores are normalised to the largest one.
    return 0.0 if importance < ROUNDING_TOLERANCE else importance


class CKAAccumulator:
    """Collects token rows of one unit over several batches and computes CKA over all of them.

    Memory is bounded by `max_tokens` rows: every row seen gets a random key from a private generator
    seeded with `seed`, and the rows with the `max_tokens` smallest keys are kept, which is a uniform
    sample without replacement over all rows seen so far (padding rows excluded). The global torch RNG
    is never used. Rows are stored detached, on the input's device, in float32 (float64 inputs stay
    float64).

    Args:
        max_tokens: Most token rows kept; must be >= 1.
        seed: Seed of the private generator that draws the sampling keys.

    Raises:
        ValueError: If max_tokens < 1.

    Example:
        >>> acc = CKAAccumulator(max_tokens=512, seed=0)
        >>> h = torch.randn(2, 5, 16)
        >>> acc.update(h, h + 0.1 * torch.randn(2, 5, 16), mask=torch.ones(2, 5, dtype=torch.bool))
        >>> acc.n_seen, acc.n_kept
        (10, 10)
    """

    def __init__(self, max_tokens: int, seed: int = 0) -> None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        self.max_tokens = max_tokens
        self._generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None  # CPU float keys of the kept rows
        self._n_seen = 0

    @property
    def n_seen(self) -> int:
        """Number of real (unmasked) token rows passed to `update` so far."""
        return self._n_seen

    @property
    def n_kept(self) -> int:
        """Number of token rows currently kept (at most `max_tokens`)."""
        return 0 if self._keys is None else int(self._keys.numel())

    @property
    def rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The kept rows (x, y) in arrival order, or None before the first real row."""
        return None if self._x is None else (self._x, self._y)

    @staticmethod
    def _flatten(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() < 1 or y.dim() < 1 or x.shape[:-1] != y.shape[:-1]:
            raise ValueError(
                "x and y must have shape [..., d] with the same leading shape; got "
                f"x {tuple(x.shape)} and y {tuple(y.shape)}"
            )
        x2 = x.detach().reshape(-1, x.shape[-1])
        y2 = y.detach().reshape(-1, y.shape[-1]).to(x.device)
        if mask is None:
            return x2, y2
        if mask.shape != x.shape[:-1]:
            raise ValueError(f"mask must have the leading shape {tuple(x.shape[:-1])} of x, got {tuple(mask.shape)}")
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(f"mask must be bool or integer (1 = real token, 0 = padding), got {mask.dtype}")
        keep = mask.detach().reshape(-1).to(device=x.device) != 0
        return x2[keep], y2[keep]

    @staticmethod
    def _storage_dtype(t: torch.Tensor) -> torch.dtype:
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    def update(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Adds the real token rows of one batch.

        Args:
            x: Activations with adapters, shape [..., d1] (e.g. [B, T, d1]).
            y: Activations without adapters, shape [..., d2], same leading shape as x.
            mask: Optional bool or integer tensor of the leading shape (e.g. an attention mask [B, T]);
                rows where it is 0/False are padding and are dropped.

        Raises:
            ValueError: If the shapes disagree with each other, with the mask, or with earlier updates.
            TypeError: If mask is a floating-point tensor.
        """
        x2, y2 = self._flatten(x, y, mask)
        if self._x is not None and (x2.shape[1] != self._x.shape[1] or y2.shape[1] != self._y.shape[1]):
            raise ValueError(
                f"feature sizes changed between updates: kept rows have d1={self._x.shape[1]}, "
                f"d2={self._y.shape[1]}; got x {tuple(x.shape)} and y {tuple(y.shape)}"
            )
        m = x2.shape[0]
        if m == 0:
            return
        self._n_seen += m
        keys = torch.rand(m, generator=self._generator, dtype=torch.float64)
        if m > self.max_tokens:  # thin the batch first so memory stays O(max_tokens * d)
            pick = torch.topk(keys, self.max_tokens, largest=False).indices.sort().values
            keys, x2, y2 = keys[pick], x2[pick.to(x2.device)], y2[pick.to(y2.device)]
        x2 = x2.to(self._storage_dtype(x2))
        y2 = y2.to(self._storage_dtype(y2))
        if self._x is None:
            self._x, self._y, self._keys = x2, y2, keys
            return
        device = self._x.device
        all_keys = torch.cat([self._keys, keys])
        all_x = torch.cat([self._x, x2.to(device=device, dtype=self._x.dtype)])
        all_y = torch.cat([self._y, y2.to(device=device, dtype=self._y.dtype)])
        if all_keys.numel() > self.max_tokens:
            pick = torch.topk(all_keys, self.max_tokens, largest=False).indices.sort().values
            all_keys, all_x, all_y = all_keys[pick], all_x[pick.to(device)], all_y[pick.to(device)]
        self._x, self._y, self._keys = all_x, all_y, all_keys

    def value(self) -> float:
        """Linear CKA over the kept rows.

        Returns:
            linear_cka of the kept x rows against the kept y rows.

        Raises:
            ValueError: If no real token row has been added yet.
        """
        if self._x is None:
            raise ValueError("no tokens accumulated yet: call update() with at least one unmasked row first")
        return linear_cka(self._x, self._y)

    def importance(self, precision: str = "float64") -> float:
        """1 - CKA over the kept rows: ``"float64"`` (:func:`importance_from_cka` of :meth:`value`, the reference) or
        ``"float32"`` (:func:`importance_by_difference`; the reference where x and y differ in width).

        Raises:
            ValueError: If no real token row has been added yet, or for an unknown precision.
        """
        if precision not in CKA_PRECISIONS:
            raise ValueError(f"unknown CKA precision {precision!r}; choose one of {CKA_PRECISIONS}.")
        if precision == "float32" and self._x is not None and self._x.shape == self._y.shape:
            return importance_by_difference(self._x, self._y)
        return importance_from_cka(self.value())
