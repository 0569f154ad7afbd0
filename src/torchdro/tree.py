"""Log-domain sampling tree: draw indices from softmax(logits) in O(B log N).

Pure numpy, no torch. Internal nodes hold the logsumexp of their children and are always
recomputed from them, never incremented, so the tree neither overflows nor drifts.

Beside each row of siblings above the leaves, the tree also keeps the row's cumulative sums
in the linear domain, relative to the row's own maximum: exp(child - max) is in [0, 1], so
nothing overflows, and a draw descends such a row with one gather and one comparison, with
no ``exp``. Those sums are refreshed whenever a row is written, from the row alone, so they
too are a pure function of the leaves. Only the leaf rows (most of the memory) are kept in
the log domain alone and exponentiated at draw time (all leaf rows at once when a batch would
otherwise exponentiate more leaves than there are). The levels near the root are small;
rather than descend them, the topmost kept level (at most ``top_size`` nodes) is summed and
searched in one pass per draw. See ``docs/theory.md`` for the derivation and
``docs/benchmarks.md`` for how the shape was chosen.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["REMOVED", "LogSumTree"]

#: A finite stand-in for log(0). Unlike -inf it keeps a row whose every leaf is removed
#: finite (no inf - inf = NaN); exp(REMOVED - x) is exactly 0 for any logit we accept.
REMOVED = -1e300

# Rows reduced at once in a full rebuild: bounds its temporary memory at large N.
_BUILD_CHUNK_ROWS = 1 << 16
# Keeps u * total strictly below total, so a draw never runs past the last child with mass.
_BELOW_ONE = 1.0 - 2.0**-52
# From this many rows on, columns are added one by one (see _cumulate).
_WIDE_ROWS = 256
# From this many draws on, the top is searched with the keys in sorted order (see
# _search_sorted).
_SORTED_KEYS = 96
# From this many rows on, a child is chosen by counting bytes (see _ByteCounter).
_WORD_ROWS = 192


def _cumulate(rows: np.ndarray, shift: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative sums of exp(rows - shift) along each row of a (k, fanout) array.

    ``shift`` (shape (k,)) defaults to the row maximum, so each row must hold a finite entry.
    Returns ``(shift, columns)``, ``columns`` of shape (fanout, k): ``columns[j, r]`` is the
    sum over children 0..j of row r, so ``columns[-1]`` holds the row totals. The rows are
    worked on, and returned, as columns: numpy reduces a short row slowly (about 80 ns of
    overhead a row) and a long column quickly. The sums run left to right one term at a
    time whichever way they are computed (one call for few rows, one call per column for
    many), so the same row gives the same bits at any k: a write and a rebuild agree
    exactly, and a child without mass never raises the sum.
    """
    columns = rows.T.copy()
    if shift is None:
        shift = np.maximum.reduce(columns, axis=0)
    columns -= shift
    np.exp(columns, out=columns)
    if rows.shape[0] < _WIDE_ROWS:
        # The ufunc's own method: numpy's wrapper (cumsum) costs a microsecond a call.
        np.add.accumulate(columns, axis=0, out=columns)
    else:  # faster than accumulate for long columns
        for j in range(1, columns.shape[0]):
            columns[j] += columns[j - 1]
    return shift, columns


def _choose_column(columns: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """``_choose_rows``' choice for cumulative masses given as columns (shape (fanout, B), from
    ``_cumulate``): the number of entries of each column at or below its threshold, counted
    along the short axis, which numpy does quickly."""
    below = columns <= uniforms * columns[-1]
    chosen: np.ndarray = np.add.reduce(below, axis=0, dtype=np.int64)
    return chosen


def _choose_rows(cum: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Per row of ``cum`` (cumulative masses, shape (B, fanout)), the first column whose
    cumulative mass exceeds ``uniforms * total``: a child with mass, as ``uniforms < 1``."""
    chosen: np.ndarray = (cum > (uniforms * cum[:, -1])[:, None]).argmax(axis=1)
    return chosen


class _ByteCounter:
    """``_choose_rows`` for many rows and a fan-out of 2, 4 or 8, by counting.

    ``argmax`` along short rows costs about 10 ns a row. Since ``cum`` never decreases along
    a row, the column sought is the number of entries at or below the threshold; a row of
    the comparison's booleans is one unsigned word of ``fanout`` bytes, each 0 or 1, and the
    word times 0x0101...01 holds their sum in its top byte (two elementwise calls). Both
    ways give the same column.
    """

    def __init__(self, fanout: int) -> None:
        if fanout not in (2, 4, 8):
            raise ValueError(f"byte counting needs a fan-out of 2, 4 or 8, got {fanout}")
        self.word: np.dtype[np.unsignedinteger[Any]] = np.dtype(f"u{fanout}")
        self.times = self.word.type(int.from_bytes(b"\x01" * fanout, "little"))
        self.shift = self.word.type(8 * (fanout - 1))

    def __call__(self, cum: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        words = (cum <= (uniforms * cum[:, -1])[:, None]).view(self.word)[:, 0]
        words *= self.times  # wraps around: the sum of the bytes lands in the top byte
        words >>= self.shift
        counted: np.ndarray = words.astype(np.int64)
        return counted


def _search_sorted(cum: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``cum.searchsorted(keys, side="right")`` for many keys: for each key, the first
    position of ``cum`` (non-decreasing) whose value exceeds it.

    A binary search per key mispredicts a branch at almost every step when the keys come
    in random order (about 60 ns a key over a top of a few hundred nodes). The keys are
    searched in sorted order instead, where consecutive searches take the same branches,
    and the results are put back in the keys' order: the same positions, found faster.
    """
    order = keys.argsort()
    nodes = np.empty(keys.size, dtype=np.int64)
    nodes[order] = cum.searchsorted(keys[order], side="right")
    return nodes


class LogSumTree:
    """A tree over ``size`` logits with ``fanout`` children per node.

    ``levels[0]`` is the top (at most ``top_size`` nodes, searched whole) and ``levels[-1]``
    the leaves. Every level below the top is padded with ``-inf`` to a multiple of
    ``fanout`` and read as rows of siblings; ``rows[d]`` are those 2-D views, and
    ``cums[d]`` (same shape as ``rows[d]``, for every level but the leaves) their cumulative
    sums relative to each row's maximum.

    Args:
        logits: shape (N,), log-weights (unnormalised log-probabilities); each row of
            ``fanout`` siblings must hold a finite one (use ``REMOVED`` for log 0).
        fanout: children per node, >= 2.
        top_size: the largest level size searched in one pass, >= 1.
    """

    def __init__(self, logits: np.ndarray, fanout: int = 8, top_size: int = 1024) -> None:
        if fanout < 2 or top_size < 1:
            raise ValueError(f"need fanout >= 2 and top_size >= 1, got {fanout}, {top_size}")
        logits = np.asarray(logits, dtype=np.float64)
        if logits.ndim != 1 or logits.size < 1:
            raise ValueError(f"logits must be a non-empty 1-D array, got shape {logits.shape}")
        self.size = int(logits.size)
        self.fanout = int(fanout)
        self._count_bytes = _ByteCounter(self.fanout) if self.fanout in (2, 4, 8) else None
        sizes = [self.size]
        while sizes[-1] > top_size:
            sizes.append(-(-sizes[-1] // fanout))
        sizes.reverse()
        self.levels: list[np.ndarray] = [np.full(sizes[0], -np.inf)]
        for n in sizes[1:]:
            self.levels.append(np.full(-(-n // fanout) * fanout, -np.inf))
        self.rows: list[np.ndarray] = [level.reshape(-1, fanout) for level in self.levels[1:]]
        self.cums: list[np.ndarray] = [np.zeros_like(rows) for rows in self.rows[:-1]]
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
        """Bytes held by every level and cumulative sum, leaves included."""
        return sum(array.nbytes for array in [*self.levels, *self.cums])

    def log_total(self) -> float:
        """logsumexp of all leaves: the log of the normaliser. O(top_size)."""
        return self._top()[0]

    def rebuild(self, logits: np.ndarray | None = None) -> None:
        """Optionally replace every leaf, then recompute all internal nodes. O(N)."""
        if logits is not None:
            self.levels[-1][: self.size] = logits
        for depth in range(self.depth - 1, -1, -1):
            self._reduce_level(depth)

    def set(self, indices: np.ndarray, logits: np.ndarray) -> None:
        """Write ``logits`` at ``indices`` (both shape (B,)) and recompute their ancestors.

        The caller guarantees valid, distinct int64 indices. Cost O(B * fanout * depth),
        and never more than a rebuild: a level with no more rows than the batch holds
        indices is recomputed whole.
        """
        self.levels[-1][indices] = logits
        nodes = indices
        fanout, kept = self.fanout, len(self.cums)
        for depth in range(self.depth - 1, -1, -1):
            rows = self.rows[depth]
            if rows.shape[0] <= nodes.size:
                # As many rows as writes: recompute whole levels from here up, as a rebuild
                # does; no gather, and no row computed twice.
                for above in range(depth, -1, -1):
                    self._reduce_level(above)
                break
            nodes = nodes // fanout
            top, columns = _cumulate(rows.take(nodes, axis=0))
            parents = np.log(columns[-1])
            parents += top
            self.levels[depth][nodes] = parents
            if depth < kept:
                # Scattered from the columns as they are: no copy back into rows.
                self.cums[depth].T[:, nodes] = columns

    def leaf_logits(self, indices: np.ndarray) -> np.ndarray:
        """The leaves at ``indices``, shape (B,)."""
        return self.levels[-1].take(indices)

    def sample(self, uniforms: np.ndarray) -> tuple[np.ndarray, float]:
        """Draw one leaf per column of ``uniforms`` (shape (depth + 1, B), values in [0, 1)).

        Returns int64 indices of shape (B,), i.i.d. from softmax(logits) when the uniforms are
        i.i.d., and ``log_total()`` as a by-product. Each level uses its own uniform, so no
        precision is lost on the way down.
        """
        uniforms = uniforms * _BELOW_ONE
        log_total, top_cum = self._top()
        count = uniforms.shape[1]
        keys = uniforms[0] * top_cum[-1]
        if count < _SORTED_KEYS:
            nodes = top_cum.searchsorted(keys, side="right")
        else:
            nodes = _search_sorted(top_cum, keys)
        choose = _choose_rows
        if self._count_bytes is not None and count >= _WORD_ROWS:
            choose = self._count_bytes
        fanout = self.fanout
        for cums, level_uniforms in zip(self.cums, uniforms[1:], strict=False):
            chosen = choose(cums.take(nodes, axis=0), level_uniforms)
            nodes *= fanout
            nodes += chosen
        if self.depth > 0:
            leaves, parents = self.rows[-1], self.levels[-2]
            # exp(row - parent) <= 1 since parent = logsumexp(row). Normalising by the row's
            # own sum rather than by 1 means rounding never selects a child without mass.
            if count * self.fanout < leaves.size:
                _, columns = _cumulate(leaves.take(nodes, axis=0), parents.take(nodes))
            else:  # the batch would exponentiate more leaves than there are: do all once
                _, columns = _cumulate(leaves, parents[: leaves.shape[0]])
                columns = columns.take(nodes, axis=1)
            nodes *= self.fanout
            nodes += _choose_column(columns, uniforms[-1])
        return nodes, log_total

    def _reduce_level(self, depth: int) -> None:
        """Recompute every node of ``levels[depth]`` (and its rows' sums) from the level below."""
        rows = self.rows[depth]
        parent = self.levels[depth]
        cums = self.cums[depth] if depth < len(self.cums) else None
        for start in range(0, rows.shape[0], _BUILD_CHUNK_ROWS):
            stop = min(start + _BUILD_CHUNK_ROWS, rows.shape[0])
            top, columns = _cumulate(rows[start:stop])
            np.add(np.log(columns[-1]), top, out=parent[start:stop])
            if cums is not None:
                cums[start:stop] = columns.T

    def _top(self) -> tuple[float, np.ndarray]:
        """logsumexp of the top level and the cumulative sums of exp(top - its max). Summed
        afresh on every call, rather than kept, so that a table small enough to sit in the
        top whole costs no memory beyond its leaves."""
        top = self.levels[0]
        peak = np.maximum.reduce(top)
        cum = np.add.accumulate(np.exp(top - peak))
        return float(peak + np.log(cum[-1])), cum
