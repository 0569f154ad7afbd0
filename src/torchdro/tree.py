"""Log-domain sampling tree: draw indices from softmax(logits) in O(B log N).

Pure numpy, no torch. Internal nodes hold the logsumexp of their children and are always
recomputed from them, never incremented, so the tree neither overflows nor drifts. The
levels near the root are small; rather than descend them one call at a time, the topmost
kept level (at most ``top_size`` nodes) is scanned in one pass per draw. See
``docs/theory.md`` for the derivation and ``docs/benchmarks.md`` for how the shape was chosen.
"""

from __future__ import annotations

import numpy as np

__all__ = ["REMOVED", "LogSumTree"]

#: A finite stand-in for log(0). Unlike -inf it keeps a row whose every leaf is removed
#: finite (no inf - inf = NaN); exp(REMOVED - x) is exactly 0 for any logit we accept.
REMOVED = -1e300

# Rows reduced at once in a full rebuild: bounds its temporary memory at large N.
_BUILD_CHUNK_ROWS = 1 << 16
# Keeps u * total strictly below total, so a draw never runs past the last child with mass.
_BELOW_ONE = 1.0 - 2.0**-52


def _row_logsumexp(rows: np.ndarray) -> np.ndarray:
    """logsumexp over the last axis of a (k, fanout) array; each row holds a finite entry."""
    top = rows.max(axis=1)
    return top + np.log(np.exp(rows - top[:, None]).sum(axis=1))


class LogSumTree:
    """A tree over ``size`` logits with ``fanout`` children per node.

    ``levels[0]`` is the top (at most ``top_size`` nodes, scanned whole) and ``levels[-1]``
    the leaves. Every level below the top is padded with ``-inf`` to a multiple of
    ``fanout`` and read as rows of siblings; ``rows[d]`` are those 2-D views.

    Args:
        logits: shape (N,), finite log-weights (unnormalised log-probabilities).
        fanout: children per node, >= 2.
        top_size: the largest level size scanned in one pass, >= 1.
    """

    def __init__(self, logits: np.ndarray, fanout: int = 32, top_size: int = 1024) -> None:
        if fanout < 2 or top_size < 1:
            raise ValueError(f"need fanout >= 2 and top_size >= 1, got {fanout}, {top_size}")
        logits = np.asarray(logits, dtype=np.float64)
        if logits.ndim != 1 or logits.size < 1:
            raise ValueError(f"logits must be a non-empty 1-D array, got shape {logits.shape}")
        self.size = int(logits.size)
        self.fanout = int(fanout)
        sizes = [self.size]
        while sizes[-1] > top_size:
            sizes.append(-(-sizes[-1] // fanout))
        sizes.reverse()
        self.levels: list[np.ndarray] = [np.full(sizes[0], -np.inf)]
        for n in sizes[1:]:
            self.levels.append(np.full(-(-n // fanout) * fanout, -np.inf))
        self.rows: list[np.ndarray] = [level.reshape(-1, fanout) for level in self.levels[1:]]
        self.rebuild(logits)

    @property
    def depth(self) -> int:
        """Number of levels below the top; a draw needs ``depth + 1`` uniforms."""
        return len(self.levels) - 1

    @property
    def logits(self) -> np.ndarray:
        """The leaves, shape (N,), float64: a read-only view."""
        view = self.levels[-1][: self.size]
        view.flags.writeable = False
        return view

    @property
    def nbytes(self) -> int:
        """Bytes held by every level, leaves included."""
        return sum(level.nbytes for level in self.levels)

    def log_total(self) -> float:
        """logsumexp of all leaves: the log of the normaliser. O(top_size)."""
        top = self.levels[0]
        peak = top.max()
        return float(peak + np.log(np.exp(top - peak).sum()))

    def rebuild(self, logits: np.ndarray | None = None) -> None:
        """Optionally replace every leaf, then recompute all internal nodes. O(N)."""
        if logits is not None:
            self.levels[-1][: self.size] = logits
        for depth in range(self.depth - 1, -1, -1):
            rows = self.rows[depth]
            parent = self.levels[depth]
            for start in range(0, rows.shape[0], _BUILD_CHUNK_ROWS):
                stop = min(start + _BUILD_CHUNK_ROWS, rows.shape[0])
                parent[start:stop] = _row_logsumexp(rows[start:stop])

    def set(self, indices: np.ndarray, logits: np.ndarray) -> None:
        """Write ``logits`` at ``indices`` (both shape (B,)) and recompute their ancestors.

        The caller guarantees valid, distinct int64 indices. Cost O(B * fanout * depth).
        """
        self.levels[-1][indices] = logits
        nodes = indices
        for depth in range(self.depth - 1, -1, -1):
            nodes = nodes // self.fanout
            self.levels[depth][nodes] = _row_logsumexp(self.rows[depth][nodes])

    def leaf_logits(self, indices: np.ndarray) -> np.ndarray:
        """The leaves at ``indices``, shape (B,)."""
        return self.levels[-1][indices]

    def sample(self, uniforms: np.ndarray) -> tuple[np.ndarray, float]:
        """Draw one leaf per column of ``uniforms`` (shape (depth + 1, B), values in [0, 1)).

        Returns int64 indices of shape (B,), i.i.d. from softmax(logits) when the uniforms are
        i.i.d., and ``log_total()`` as a by-product. Each level uses its own uniform, so no
        precision is lost on the way down.
        """
        uniforms = uniforms * _BELOW_ONE
        top = self.levels[0]
        peak = top.max()
        cdf = np.exp(top - peak).cumsum()
        nodes = np.searchsorted(cdf, uniforms[0] * cdf[-1], side="right")
        for depth in range(1, self.depth + 1):
            parent = self.levels[depth - 1][nodes]
            # exp(row - parent) <= 1 since parent = logsumexp(row). Normalising by the row's
            # own sum rather than by 1 means rounding never selects a child without mass.
            cum = np.exp(self.rows[depth - 1][nodes] - parent[:, None]).cumsum(axis=1)
            chosen = (cum > (uniforms[depth] * cum[:, -1])[:, None]).argmax(axis=1)
            nodes = nodes * self.fanout + chosen
        return nodes, float(peak + np.log(cdf[-1]))
