"""The hardness weighted sampler: a torch batch sampler over a table of stale losses.

Each batch is drawn from p = softmax(beta * L), where L holds the last loss seen for every
example; ``update`` writes the fresh losses back. SGD on batches drawn this way is SGD on the
KL-DRO loss (1/beta) * log mean exp(beta * loss). Derivations are in ``docs/theory.md``.

``HardnessWeightedSampler`` is a thin composition (``docs/architecture.md``): a ``LossTable``
(the losses, the law, draws, writes, weights, diagnostics), an ``EpochStream`` and
``InFlightBatches`` (epochs, warm-up, batches yielded but not yet updated), and, under DDP, a
``RankSync`` (the collectives).
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from torchdro._validation import check_positive_int
from torchdro._warnings import warn_user
from torchdro.data import check_loader_wiring
from torchdro.distributed import RankSync, default_sync
from torchdro.laws import KL, Law
from torchdro.records import DrawInfo, DrawnBatch, DrawnIndex, Indices, Values
from torchdro.stream import Batch, EpochStream, InFlightBatches, StreamSettings
from torchdro.table import (
    LossTable,
    NonFinitePolicy,
    SamplerCollapseWarning,
    TableSettings,
    as_weight_tensor,
)

# DrawInfo and DrawnIndex are re-exported: 0.1.0 code imports them from here.
__all__ = ["DrawInfo", "DrawnIndex", "HardnessWeightedSampler", "SamplerCollapseWarning"]

#: Version of the ``state_dict`` layout; bumped whenever a key changes meaning. Version 1
#: (torchdro 0.1.0) is still read.
STATE_VERSION = 2

_STATE_KEYS_V1 = frozenset(
    {"version", "settings", "seed", "losses", "last_update", "num_updates", "epoch",
     "position", "in_epoch", "batches_drawn", "world_size", "pending", "rng"}
)  # fmt: skip
_STATE_KEYS = _STATE_KEYS_V1 | {"num_skipped", "refitting", "fit"}
_TABLE_FIELDS = frozenset(f.name for f in dataclasses.fields(TableSettings))
_STREAM_FIELDS = frozenset(f.name for f in dataclasses.fields(StreamSettings))
_V1_SETTINGS = (_TABLE_FIELDS | _STREAM_FIELDS) - {"nonfinite", "max_loss", "within_beta"}
#: Settings a checkpoint may leave as the constructor set them (``load_state_dict(keep=)``):
#: they change how the stream continues but not its shape.
KEEPABLE_SETTINGS = frozenset(
    {"law", "importance_weights", "clip_weights", "momentum", "min_ess_fraction",
     "nonfinite", "max_loss"}
)  # fmt: skip


class HardnessWeightedSampler(Sampler[list[int]]):
    """Draws batches of example indices from softmax(beta * stale per-example loss).

    A torch batch sampler: pass it as ``DataLoader(IndexedDataset(dataset),
    batch_sampler=sampler)``. Each iteration yields a list of ``batch_size`` indices
    (``DrawnIndex``, an ``int``); one epoch is ``len(sampler)`` batches. After the forward
    pass, call ``update(draw, losses)``.

    Args:
        num_samples: N, the number of examples in the dataset.
        batch_size: indices per batch (per rank under DDP). May change between epochs.
        beta: inverse temperature, in inverse loss units; 0 draws i.i.d. uniformly with
            replacement (ERM's objective, though not a per-epoch shuffle). What matters is
            beta * (spread of the losses): see ``docs/choosing-beta.md``. Pass ``None``
            together with ``kl_radius`` to have it calibrated instead, or give ``law``.
        init_loss: the table's starting value, in loss units. A float (plus relative noise of
            1e-6 to break ties) or a vector of N values. Above the typical loss, so that
            unseen examples are drawn first.
        replacement: True draws i.i.d. from p (the theory's case). False draws without
            repetition inside a batch by successive sampling: each next index is drawn from
            p renormalised over the indices not yet in the batch.
        momentum: in [0, 1). The table keeps ``momentum * old + (1 - momentum) * new``; an
            example's first observation is written as is.
        importance_weights: ``update`` returns self-normalised weights that correct for the
            table's staleness (mean 1 over the batch); otherwise ones.
        clip_weights: optional ``(low, high)`` bounds applied to the weights after
            normalisation.
        num_batches: batches per epoch after the warm-up; default ceil(N / batch_size).
        seed: seeds the draws and the init noise; None picks fresh entropy (kept in the
            state dict, so a run stays resumable).
        beta_schedule: optional ``epoch -> beta``, applied when each epoch starts.
        warmup_epochs: the first ``warmup_epochs`` epochs visit every example exactly once in
            a uniform random order (ceil(N / batch_size) batches, the last one shorter if
            needed), with importance weights of 1: plain ERM that fills the table with real
            losses before hardness weighting starts.
        kl_radius: the constrained form of KL-DRO, ``law=KL(radius=kl_radius)``. beta is
            recalibrated so that KL(p || uniform) = kl_radius (nats) over the current table:
            when each epoch after the warm-up starts, and every ``refit_interval`` updates if
            that is set. Until the first calibration beta is 0. Scale-free, unlike beta.
        law: instead of ``beta`` or ``kl_radius``, any member of the DRO family from
            ``torchdro.laws``: ``KL(beta=...)``, ``KL(radius=...)``, ``CVaR(alpha=...)``,
            ``ChiSquare(radius=...)`` or ``ChiSquare(penalty=...)``. A law whose worst case
            depends on the whole table is refitted when each epoch after the warm-up starts
            and every ``refit_interval`` updates; between refits the fit is frozen
            (``docs/theory.md``, "The DRO family").
        refit_interval: updates between refits of the law (KL radius, CVaR, chi-square).
        beta_update_interval: the 0.1.0 name of ``refit_interval``.
        min_ess_fraction: when an epoch starts and every example has been observed, a
            ``SamplerCollapseWarning`` is issued if the effective sample size 1 / sum p^2 is
            below this fraction of N (0 disables it). See ``docs/choosing-beta.md``.
        nonfinite: what ``update`` does with a NaN or inf loss. ``"raise"`` (default): a
            ValueError naming the examples, nothing written. ``"skip"``: those entries keep
            their stale loss, get weight 0, and are counted in ``stats()["skipped_nonfinite"]``
            (for mixed precision, where a grad scaler skips an occasional overflowed step).
        max_loss: optional cap, in loss units, on the losses written and weighted (like a
            maximum priority): one enormous finite loss otherwise takes all of p.
        distributed: None (default) follows ``torch.distributed``: with an initialised
            process group of more than one rank, or a ``process_group``, the sampler becomes
            one sampler over the whole dataset across ranks (``batch_size`` is then per rank;
            see ``docs/distributed.md``). False keeps it local to this process.
        process_group: the group to synchronise over; default the default group.
        shared_table: keep the loss table in shared memory, so that processes forked after
            construction read every update.
        groups: optional group id of every example (ints, shape (N,)): the law then acts on
            the groups' mean stale losses, each non-empty group one unit of it (uniform over
            groups is group-balanced sampling; ``CVaR(alpha=1/G)`` is the worst group), and
            examples are drawn uniformly within their group. Refitted like a threshold
            (``refit_interval``). See ``docs/theory.md``, "Groups".
        within_beta: with ``groups``, draw within each group by softmax(within_beta * L)
            (inverse loss units) instead of uniformly; the group law then acts on each
            group's own KL-DRO value, so that the two-level draw stays unbiased.

    Settings that may change during training have validated setters: ``beta``,
    ``importance_weights``, ``clip_weights``, ``momentum``, ``min_ess_fraction``,
    ``nonfinite``, ``max_loss`` (any time) and ``batch_size``, ``num_batches`` (between
    epochs). The others are read-only.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        beta: float | None = None,
        init_loss: float | Values = 10.0,
        replacement: bool = True,
        momentum: float = 0.0,
        importance_weights: bool = False,
        clip_weights: tuple[float, float] | None = None,
        num_batches: int | None = None,
        seed: int | None = None,
        beta_schedule: Callable[[int], float] | None = None,
        warmup_epochs: int = 0,
        kl_radius: float | None = None,
        law: Law | None = None,
        refit_interval: int | None = None,
        beta_update_interval: int | None = None,
        min_ess_fraction: float = 0.1,
        nonfinite: NonFinitePolicy = "raise",
        max_loss: float | None = None,
        distributed: bool | None = None,
        process_group: Any = None,
        shared_table: bool = False,
        groups: Indices | None = None,
        within_beta: float = 0.0,
    ) -> None:
        if sum(x is not None for x in (beta, kl_radius, law)) != 1:
            raise TypeError("give exactly one of beta, kl_radius and law")
        if law is None and beta is not None:
            law = KL(beta=beta)
        elif law is None:
            try:
                law = KL(radius=kl_radius)
            except ValueError as error:  # name the argument as the caller wrote it
                raise ValueError(str(error).replace("radius", "kl_radius", 1)) from None
        if beta_schedule is not None and not (isinstance(law, KL) and law.beta is not None):
            raise TypeError("beta_schedule needs a fixed beta (KL(beta=...)), not a radius or law")
        if beta_update_interval is not None:
            if refit_interval is not None:
                raise TypeError("give refit_interval only (beta_update_interval is its old name)")
            refit_interval = check_positive_int(beta_update_interval, "beta_update_interval")
        table_settings = TableSettings(
            num_samples=num_samples,
            law=law,
            replacement=replacement,
            momentum=momentum,
            importance_weights=importance_weights,
            clip_weights=clip_weights,
            refit_interval=refit_interval,
            min_ess_fraction=min_ess_fraction,
            nonfinite=nonfinite,
            max_loss=max_loss,
            within_beta=within_beta,
        )
        stream_settings = StreamSettings(batch_size, num_batches, warmup_epochs)
        self._sync: RankSync | None = None
        if distributed is not False:
            self._sync = default_sync(process_group)
            if distributed and self._sync is None:
                raise ValueError("distributed=True needs an initialised torch.distributed group")
        self.world_size = 1 if self._sync is None else self._sync.world_size
        self.rank = 0 if self._sync is None else self._sync.rank
        _check_fits(table_settings, stream_settings, self.world_size)
        if seed is None:
            seed = int(np.random.SeedSequence().entropy)  # type: ignore[arg-type]
        elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise TypeError(f"seed must be a non-negative int or None, got {seed!r}")
        if self._sync is not None:
            seed = self._sync.agree_on_seed(seed)  # one generator, advanced alike everywhere
        self.beta_schedule = beta_schedule
        self.table = LossTable(table_settings, init_loss=init_loss, seed=seed,
                               shared=shared_table, groups=groups)  # fmt: skip
        if self._sync is not None and not isinstance(init_loss, (int, float)):
            self._sync.check_same(self.table.losses.numpy(), "init_loss")
        if self._sync is not None and self.table.groups is not None:
            self._sync.check_same(self.table.groups.ids.astype(np.float64), "groups")
        self.stream = EpochStream(stream_settings, num_samples, seed)
        self.in_flight = InFlightBatches()
        self._updates_at_epoch_start: int | None = 0
        self._warned_no_update = False
        self._warned_double_update = False

    # ------------------------------------------------------------------ batch sampler protocol

    def __len__(self) -> int:
        """Batches in the current epoch, or in the next one between epochs."""
        return self.stream.length(self._global_batch)

    @property
    def _global_batch(self) -> int:
        return self.stream.settings.batch_size * self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        check_loader_wiring(sys._getframe(1), self)
        # A checkpoint's in-flight batches finish the interrupted epoch before anything new.
        if not self.stream.in_epoch and not self.in_flight.has_replay:
            self._start_epoch()
        for batch in self.in_flight.replays():
            yield self._local_batch(batch)
        length = len(self)  # fixed within an epoch: its settings change only between epochs
        while self.stream.in_epoch and self.stream.position < length:
            indices, log_probs = self._next_indices()
            batch = Batch(self.stream.advance(self._global_batch), indices, log_probs)
            self.in_flight.remember(batch)
            yield self._local_batch(batch)
        self.stream.in_epoch = False

    def _local_batch(self, batch: Batch) -> DrawnBatch:
        # Every rank draws the same global batch; each keeps its own contiguous slice.
        indices, log_probs = batch.indices, batch.log_probs
        # Read-only: the yielded batch shares these arrays, and update trusts them.
        indices.flags.writeable = False
        log_probs.flags.writeable = False
        if self.world_size > 1:
            size = self.stream.settings.batch_size
            part = slice(self.rank * size, (self.rank + 1) * size)
            indices, log_probs = indices[part], log_probs[part]
        return DrawnBatch(indices, log_probs, batch.batch_id, source=self.table.token)

    def _start_epoch(self) -> None:
        if (
            self._updates_at_epoch_start is not None
            and self.stream.epoch >= 0
            and self.stream.batches_drawn > 0
            and self.table.num_updates == self._updates_at_epoch_start
            and not self._warned_no_update
        ):
            self._warned_no_update = True
            warn_user(
                f"epoch {self.stream.epoch} ended without a single sampler.update() call: the "
                "table never changed, so training was plain ERM (i.i.d. uniform draws at best). "
                "Call sampler.update(draw, per_example_losses) after every forward pass.",
                RuntimeWarning,
            )
        self._updates_at_epoch_start = self.table.num_updates
        self.stream.start_epoch()
        self.in_flight.clear_pending()
        epoch = self.stream.epoch
        if self.beta_schedule is not None:
            self.table.beta = self.beta_schedule(epoch)
        if self.table.needs_refit and not self.stream.warming_up:
            self.table.refit()
        self.table.check_collapse(epoch)

    def _next_indices(self) -> tuple[np.ndarray, np.ndarray]:
        size = self._global_batch
        if self.stream.warming_up:
            indices = self.stream.warmup_indices(size, pad=self.world_size > 1)
            return indices, np.full(indices.size, np.nan)
        return self.table.draw_arrays(size)

    # ------------------------------------------------------------------ updates

    def update(
        self,
        indices: DrawInfo | Indices,
        losses: Values,
        drawn_log_probs: Values | None = None,
    ) -> torch.Tensor:
        """Write fresh per-example losses into the table; return importance weights.

        Args:
            indices: the batch's examples: a ``DrawInfo`` (what ``IndexedDataset`` yields,
                collated), the list of ``DrawnIndex`` the sampler yielded, or integer indices
                of shape (B,) (duplicates allowed; applied in order).
            losses: shape (B,), their fresh losses in any floating dtype (bfloat16 included;
                a tensor may require grad: it is detached). Finite, unless ``nonfinite='skip'``.
            drawn_log_probs: shape (B,), log p of each example when it was drawn; NaN marks
                an example not drawn by hardness (weight 1). Taken from a ``DrawInfo``
                automatically. Default: the table's current probabilities, which is exact
                without prefetch.

        Returns:
            Weights of shape (B,) on the losses' device, in the losses' floating dtype
            (float32 otherwise): ones, or with ``importance_weights`` the self-normalised
            weights p_target / p_drawn (mean 1 before clipping); 0 for a skipped loss.
        """
        try:
            checked = self.table.check_update(indices, losses, drawn_log_probs)
        except (TypeError, ValueError, IndexError):
            if self._sync is not None:  # the other ranks must not wait forever
                self._sync.gather_updates(None, None, None, self.stream.settings.batch_size)
            raise
        weights = self.table.importance_weights(checked)
        index_array, loss_array = checked.indices, checked.losses
        if self._sync is not None:
            index_array, loss_array, rank_ids = self._sync.gather_updates(
                index_array, loss_array, checked.all_batch_ids(), self.stream.settings.batch_size
            )
            _check_ranks_in_step(rank_ids)
            # Another rank's losses may be non-finite (nonfinite="skip"): apply checks them.
            self.table.apply(index_array, loss_array)
            fresh = self.in_flight.acknowledge(index_array, np.concatenate(rank_ids))
        else:
            self.table.apply(index_array, loss_array, checked.finite)
            fresh = self.in_flight.acknowledge(index_array, checked.batch_ids, checked.batch)
        if not fresh and not self._warned_double_update:
            self._warned_double_update = True
            warn_user(
                "a batch was passed to update() twice: its losses were written and counted "
                "again. Call update() once per batch.",
                RuntimeWarning,
            )
        return as_weight_tensor(weights, losses, checked.indices.size)

    def weights(
        self,
        indices: DrawInfo | Indices,
        losses: Values,
        drawn_log_probs: Values | None = None,
    ) -> torch.Tensor:
        """The importance weights ``update`` would return, without writing anything.

        For frameworks that must form the weighted loss before the table is updated (the
        Lightning and MONAI adapters). Same arguments and result as ``update``; local to
        this rank, no communication.
        """
        return self.table.weights(indices, losses, drawn_log_probs)

    @property
    def batches_consumed(self) -> int:
        """Batches of the current epoch yielded and already updated; 0 between epochs.

        After ``load_state_dict`` this is how many batches of the interrupted epoch a
        framework that counts steps (Lightning, the Hugging Face ``Trainer``) has done.
        """
        in_flight = self.in_flight.count
        if not (self.stream.in_epoch or in_flight):
            return 0
        return self.stream.position - in_flight

    def discard_in_flight(self) -> int:
        """Forget the batches yielded but not updated, so that a checkpoint does not replay
        them: for a loop that abandons its DataLoader iterator mid-epoch on purpose (e.g.
        Lightning's ``limit_train_batches``). Returns how many were dropped."""
        return self.in_flight.discard()

    # ------------------------------------------------------------------ settings

    @property
    def num_samples(self) -> int:
        """N, the number of examples (read-only)."""
        return self.table.num_samples

    @property
    def seed(self) -> int:
        """The generator's seed (read-only; agreed across ranks under DDP)."""
        return self.table.seed

    @property
    def batch_size(self) -> int:
        """Indices per batch and rank. May change between epochs, not within one."""
        return self.stream.settings.batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self._change_stream(batch_size=value)

    @property
    def num_batches(self) -> int | None:
        """Batches per epoch after the warm-up (None: ceil(N / global batch)). May change
        between epochs."""
        return self.stream.settings.num_batches

    @num_batches.setter
    def num_batches(self, value: int | None) -> None:
        self._change_stream(num_batches=value)

    def _change_stream(self, **changes: Any) -> None:
        if self.stream.in_epoch:
            names = ", ".join(changes)
            raise RuntimeError(f"{names} can change only between epochs, not during one")
        new = dataclasses.replace(self.stream.settings, **changes)
        _check_fits(self.table.settings, new, self.world_size)
        self.stream.settings = new

    @property
    def warmup_epochs(self) -> int:
        """Uniform epochs before hardness weighting starts (read-only)."""
        return self.stream.settings.warmup_epochs

    @property
    def beta(self) -> float:
        """Inverse temperature, in inverse loss units. Setting it rebuilds the tree, O(N)."""
        return self.table.beta

    @beta.setter
    def beta(self, value: float) -> None:
        self.table.beta = value

    @property
    def kl_radius(self) -> float | None:
        """The KL radius in nats, or None when the law is not ``KL(radius=...)`` (read-only)."""
        law = self.table.law
        return law.radius if isinstance(law, KL) else None

    @property
    def law(self) -> Law:
        """The DRO law sampled from (read-only; ``beta`` has a setter for ``KL(beta=...)``)."""
        return self.table.law

    @property
    def replacement(self) -> bool:
        """Whether draws are i.i.d. (True) or distinct within a batch (read-only)."""
        return self.table.settings.replacement

    @property
    def refit_interval(self) -> int | None:
        """Updates between refits of the law (read-only)."""
        return self.table.settings.refit_interval

    @property
    def importance_weights(self) -> bool:
        """Whether ``update`` returns staleness-correcting weights (settable)."""
        return self.table.settings.importance_weights

    @importance_weights.setter
    def importance_weights(self, value: bool) -> None:
        self.table.configure(importance_weights=value)

    @property
    def clip_weights(self) -> tuple[float, float] | None:
        """(low, high) bounds on the weights, or None (settable)."""
        return self.table.settings.clip_weights

    @clip_weights.setter
    def clip_weights(self, value: tuple[float, float] | None) -> None:
        self.table.configure(clip_weights=value)

    @property
    def momentum(self) -> float:
        """EMA factor of the table's writes, in [0, 1) (settable)."""
        return self.table.settings.momentum

    @momentum.setter
    def momentum(self, value: float) -> None:
        self.table.configure(momentum=value)

    @property
    def min_ess_fraction(self) -> float:
        """The collapse warning's threshold, a fraction of N (settable)."""
        return self.table.settings.min_ess_fraction

    @min_ess_fraction.setter
    def min_ess_fraction(self, value: float) -> None:
        self.table.configure(min_ess_fraction=value)

    @property
    def nonfinite(self) -> NonFinitePolicy:
        """The policy for NaN / inf losses, "raise" or "skip" (settable)."""
        return self.table.settings.nonfinite

    @nonfinite.setter
    def nonfinite(self, value: NonFinitePolicy) -> None:
        self.table.configure(nonfinite=value)

    @property
    def max_loss(self) -> float | None:
        """Cap on written losses, in loss units, or None (settable)."""
        return self.table.settings.max_loss

    @max_loss.setter
    def max_loss(self, value: float | None) -> None:
        self.table.configure(max_loss=value)

    def calibrate_beta(self) -> float:
        """Set beta so that KL(p || uniform) = ``kl_radius`` over the current table. O(N log).

        Called automatically in ``kl_radius`` mode (see the class docstring); returns beta.
        """
        return self.table.calibrate_beta()

    # ------------------------------------------------------------------ inspection

    @property
    def losses(self) -> torch.Tensor:
        """A copy of the stale-loss table, float64, shape (N,), in loss units."""
        return self.table.losses

    @property
    def epoch(self) -> int:
        """Index of the current (or last finished) epoch; -1 before the first."""
        return self.stream.epoch

    @property
    def num_updates(self) -> int:
        """How many ``update`` calls have written to the table."""
        return self.table.num_updates

    def log_probabilities(self) -> torch.Tensor:
        """log softmax(beta * L), float64, shape (N,). O(N)."""
        return self.table.log_probabilities()

    def probabilities(self) -> torch.Tensor:
        """softmax(beta * L), float64, shape (N,), summing to 1. O(N)."""
        return self.table.probabilities()

    def effective_sample_size(self) -> float:
        """1 / sum p^2, in examples: N for uniform sampling, 1 for a point mass. O(N)."""
        return self.table.effective_sample_size()

    def staleness(self) -> tuple[float, int]:
        """Mean and max number of updates since each observed example was last written."""
        return self.table.staleness()

    def hardest(self, k: int) -> torch.Tensor:
        """Indices of the k largest stale losses, largest first, int64, shape (k,). O(N)."""
        return self.table.hardest(k)

    def stats(self) -> dict[str, float]:
        """Diagnostics of the current distribution, O(N); keys as ``LossTable.stats``."""
        return self.table.stats()

    @property
    def nbytes(self) -> int:
        """Bytes held per sampler: table, tree and bookkeeping."""
        return self.table.nbytes

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the exact batch stream, mid-epoch too.

        That includes the batches drawn but not yet passed to ``update`` (DataLoader
        prefetch): a restored sampler yields them again first, with their drawn
        probabilities. ``beta_schedule`` is code and is not saved. Only tensors and plain
        Python values: safe for ``torch.load(weights_only=True)``.
        """
        table = self.table.state_dict()
        settings = {**table.pop("settings"), **dataclasses.asdict(self.stream.settings)}
        return {
            "version": STATE_VERSION,
            "settings": settings,
            **table,
            **self.stream.state_dict(),
            "world_size": self.world_size,
            "pending": self.in_flight.state(),
        }

    def load_state_dict(self, state: Mapping[str, Any], *, keep: Iterable[str] = ()) -> None:
        """Restore a ``state_dict``; everything is checked before anything changes.

        The checkpoint's settings win, so that the stream continues exactly: each one that
        differs from this sampler's is listed in a ``UserWarning``. ``keep`` names settings
        to leave as this sampler has them instead (any of ``KEEPABLE_SETTINGS``: law (or its
        alias beta), importance_weights, clip_weights, momentum, min_ess_fraction, nonfinite,
        max_loss); a kept law is refitted on the restored table. Reads version 1 (torchdro
        0.1.0) and 2.
        """
        keep = frozenset("law" if name == "beta" else name for name in keep)
        if keep - KEEPABLE_SETTINGS:
            raise ValueError(
                f"keep may name only {', '.join(sorted(KEEPABLE_SETTINGS))}; "
                f"got {', '.join(sorted(keep - KEEPABLE_SETTINGS))}"
            )
        state = _upgrade(state)
        raw = dict(state["settings"])
        for name in keep:
            raw[name] = getattr(self.table.settings, name)
        if "law" in keep and raw["law"] != state["settings"].get("law"):
            state = {**state, "fit": None}  # the checkpoint's fit belongs to another law
        required = _V1_SETTINGS if state["version_read"] == 1 else _TABLE_FIELDS | _STREAM_FIELDS
        table_settings, stream_settings = _settings_from_state(raw, required)
        if table_settings.num_samples != self.num_samples:
            raise ValueError(
                f"state dict is for {table_settings.num_samples} examples, "
                f"this sampler has {self.num_samples}"
            )
        table_state = LossTable.check_state(state, table_settings, self.table.groups)
        stream_state = EpochStream.check_state(state)
        replay = InFlightBatches.check_state(state["pending"], self.num_samples, stream_state[3])
        world_size = check_positive_int(state["world_size"], "state dict world_size")
        if world_size != self.world_size:
            warnings.warn(
                f"the state dict was saved with {world_size} rank(s) and is loaded on "
                f"{self.world_size}: training continues, but not as the same batch stream",
                RuntimeWarning,
                stacklevel=2,
            )
            replay = OrderedDict()  # in-flight batches are sized for the old world
        # beta that a schedule or a radius moved is the run's state, not a changed setting.
        beta_moves = self.beta_schedule is not None or self.kl_radius is not None
        changed = _differences(self.table.settings, table_settings, beta_moves) + _differences(
            self.stream.settings, stream_settings, beta_moves
        )
        if changed:
            warnings.warn(
                "load_state_dict: the checkpoint's settings replace this sampler's: "
                + "; ".join(changed)
                + ". Pass keep=(...) to keep the law (beta), importance_weights, clip_weights, "
                "momentum, min_ess_fraction, nonfinite or max_loss as constructed.",
                UserWarning,
                stacklevel=2,
            )
        self.table.restore(table_state)
        self.stream.settings = stream_settings
        self.stream.restore(stream_state, table_state.seed)
        self.in_flight.restore(replay)
        self._updates_at_epoch_start = None  # the epoch before the checkpoint is not ours to judge


def _check_fits(table: TableSettings, stream: StreamSettings, world_size: int) -> None:
    if not table.replacement and stream.batch_size * world_size > table.num_samples:
        raise ValueError(
            f"{world_size} rank(s) x batch_size {stream.batch_size} exceeds num_samples "
            f"{table.num_samples}, which sampling without replacement cannot serve"
        )


def _upgrade(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """Check a state dict's envelope and bring version 1 to the current layout."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping, got {type(state).__name__}")
    version = state.get("version")
    if version not in (1, STATE_VERSION):
        raise ValueError(
            f"state dict version {version!r} is not supported "
            f"(this torchdro reads versions 1 and {STATE_VERSION})"
        )
    missing = sorted((_STATE_KEYS_V1 if version == 1 else _STATE_KEYS) - set(state))
    if missing:
        raise ValueError(f"state dict is missing keys: {', '.join(missing)}")
    if not isinstance(state["settings"], Mapping):
        raise ValueError("state dict settings must be a mapping")
    if version == 1:
        # 0.1.0: KL only (beta or kl_radius), no skip policy, recalibration by radius from the
        # first hard epoch on.
        settings = dict(state["settings"])
        beta, radius = settings.pop("beta", None), settings.pop("kl_radius", None)
        settings["refit_interval"] = settings.pop("beta_update_interval", None)
        try:
            settings["law"] = KL(radius=radius) if radius is not None else KL(beta=beta)
        except (TypeError, ValueError) as error:
            raise ValueError(f"state dict settings: {error}") from error
        epoch, warmup = state["epoch"], settings.get("warmup_epochs", 0)
        refitting = (
            radius is not None
            and isinstance(epoch, int)
            and isinstance(warmup, int)
            and epoch >= warmup
        )
        state = {**state, "settings": settings, "num_skipped": 0, "refitting": refitting,
                 "fit": [beta, 0.0], "groups": None, "group_fit": None}  # fmt: skip
    return {**state, "version_read": version}


def _settings_from_state(
    raw: Mapping[str, Any], required: frozenset[str]
) -> tuple[TableSettings, StreamSettings]:
    unknown = sorted(set(raw) - _TABLE_FIELDS - _STREAM_FIELDS)
    if unknown:
        raise ValueError(f"state dict settings has unknown names: {', '.join(unknown)}")
    missing = sorted(required - set(raw))
    if missing:
        raise ValueError(f"state dict settings is missing: {', '.join(missing)}")
    try:
        table = TableSettings(**{k: v for k, v in raw.items() if k in _TABLE_FIELDS})
        stream = StreamSettings(**{k: v for k, v in raw.items() if k in _STREAM_FIELDS})
    except (TypeError, ValueError) as error:
        raise ValueError(f"state dict settings: {error}") from error
    return table, stream


def _differences(mine: Any, theirs: Any, beta_moves: bool) -> list[str]:
    return [
        f"{field.name} {getattr(mine, field.name)!r} -> {getattr(theirs, field.name)!r}"
        for field in dataclasses.fields(mine)
        if getattr(mine, field.name) != getattr(theirs, field.name)
        and not (field.name == "law" and beta_moves)
    ]


def _check_ranks_in_step(rank_ids: Sequence[np.ndarray]) -> None:
    # With DrawInfo, every rank of one step updates the same global batch; if not, the ranks'
    # loaders are out of step (different prefetch settings, or in_order=False).
    firsts = {int(ids[0]) for ids in rank_ids if ids.size and ids[0] >= 0}
    if len(firsts) > 1:
        warn_user(
            f"ranks updated different global batches in one step ({sorted(firsts)}): their "
            "DataLoaders are out of step. Tables stay identical, but each rank's batch was "
            "not drawn from the table the others saw; see docs/distributed.md",
            RuntimeWarning,
        )
