"""Train / validation / test splits over groups (patients or volumes), and the papers' protocols.

No split puts one group on both sides: every function here checks it with :func:`assert_disjoint`
before returning, and trainers can call it again on anything they build.

Protocols
---------
- :func:`covid19ctseg_folds`: the 5-fold protocol of 000/001/002 on COVID-19-CT-Seg, 4 training / 16 test
  volumes per fold - the benchmark's predefined split (from its file, or the published fold lists in
  :data:`training.datasets.BENCHMARK_TASK1_TRAIN`), or, with ``source="generated"``, the same shape built
  deterministically and patient-disjoint (see its docstring for why that differs).
- :func:`ctseg2d_protocol_folds`: the issue's CPU protocol on the shared 2D slices: 18 volume groups,
  4 training and 14 test groups per fold, the Radiopaedia groups 10-19 kept together (always in test).
- :func:`ctseg2d_kfold`: ordinary grouped k-fold on the same slices (every volume group tested once,
  training on the rest), with the Radiopaedia block as one unit: issue 6's model selection.
- :func:`medseg_train_val_test`: 004's protocol: 80 / 20 of the MedSeg slices for training / validation
  (model selection), testing on Radiopaedia volumes.
- :func:`grouped_kfold` and :func:`grouped_holdout`: general grouped cross-validation and hold-out (e.g.
  the 80/20 pre-training splits of 000, MosMedData's 40/10, nCoVSegNet's quarter for validation).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

from training.datasets.base import Case
from training.datasets.covid19ctseg import BENCHMARK_TASK1_TRAIN, group_of, read_benchmark_split


@dataclass(frozen=True)
class Split:
    """Case ids of one split. ``val`` may be empty (the papers' CV protocols have no validation set)."""

    name: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    val: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def subset(self, which: str) -> tuple[str, ...]:
        if which not in ("train", "val", "test"):
            raise ValueError(f"unknown subset {which!r}; use train, val or test")
        return getattr(self, which)

    def select(self, cases: Sequence[Case], which: str) -> list[Case]:
        """The cases of ``which`` subset, in the split's order."""
        return select(cases, self.subset(which))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "train": list(self.train), "val": list(self.val), "test": list(self.test),
                "notes": list(self.notes), "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Split":
        return cls(name=d["name"], train=tuple(d["train"]), test=tuple(d["test"]), val=tuple(d.get("val", ())),
                   notes=tuple(d.get("notes", ())), meta=dict(d.get("meta", {})))


def select(cases: Sequence[Case], ids: Iterable[str]) -> list[Case]:
    """Cases with the given ids, in that order; raises ``KeyError`` naming unknown ids."""
    by_id = {c.id: c for c in cases}
    ids = list(ids)
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise KeyError(f"{len(unknown)} case id(s) not in the data set: {', '.join(unknown[:8])}"
                       f"{' ...' if len(unknown) > 8 else ''}")
    return [by_id[i] for i in ids]


def groups_of(cases: Sequence[Case]) -> dict[str, str]:
    """``{case id: group}``; raises when two cases share an id."""
    out: dict[str, str] = {}
    for c in cases:
        if c.id in out:
            raise ValueError(f"duplicate case id {c.id!r}")
        out[c.id] = c.group
    return out


#: ``Split.meta["disjoint"]`` of protocols that define disjointness per case (volume), not per patient group.
DISJOINT_BY_CASE = "case"


def protocol_groups(split: Split, cases: Sequence[Case]) -> dict[str, str]:
    """``{case id: unit}`` at the level the split's protocol defines disjointness: the case itself when
    ``split.meta["disjoint"]`` is :data:`DISJOINT_BY_CASE` (the benchmark's published folds are
    volume-disjoint only), else the case's group (patient). Pass it to :func:`assert_disjoint`."""
    if split.meta.get("disjoint") == DISJOINT_BY_CASE:
        return {c.id: c.id for c in cases}
    return groups_of(cases)


def assert_disjoint(split: Split, groups: Mapping[str, str] | Sequence[Case] | None = None) -> None:
    """Raise ``AssertionError`` when a case id, or (given ``groups``) a group, is on two sides of ``split``.

    ``groups`` is ``{case id: group}`` or the cases themselves. Runs under ``python -O`` too (explicit
    raise, not an ``assert`` statement).
    """
    sides = {"train": split.train, "val": split.val, "test": split.test}
    for name, ids in sides.items():
        if len(set(ids)) != len(ids):
            raise AssertionError(f"split {split.name!r}: duplicate case ids in {name}")
    names = list(sides)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = set(sides[a]) & set(sides[b])
            if both:
                raise AssertionError(f"split {split.name!r}: case(s) {sorted(both)[:5]} in both {a} and {b}")
    if groups is None:
        return
    mapping = groups if isinstance(groups, Mapping) else groups_of(groups)
    side_groups = {}
    for name, ids in sides.items():
        missing = [i for i in ids if i not in mapping]
        if missing:
            raise AssertionError(f"split {split.name!r}: no group known for {missing[:5]}")
        side_groups[name] = {mapping[i] for i in ids}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = side_groups[a] & side_groups[b]
            if both:
                raise AssertionError(f"split {split.name!r}: group(s) {sorted(both)[:5]} on both sides ({a} and {b})")


# ----------------------------------------------------------------------------------------------------------
# General grouped splits
# ----------------------------------------------------------------------------------------------------------

def _group_table(cases: Sequence[Case], stratify_by: Callable[[Case], Any] | None):
    groups: dict[str, list[str]] = {}
    strata: dict[str, Any] = {}
    for c in cases:
        groups.setdefault(c.group, []).append(c.id)
        s = stratify_by(c) if stratify_by else None
        if strata.setdefault(c.group, s) != s:
            raise ValueError(f"group {c.group!r} mixes strata {strata[c.group]!r} and {s!r}")
    return groups, strata


def grouped_kfold(cases: Sequence[Case], n_folds: int, seed: int = 0,
                  stratify_by: Callable[[Case], Any] | None = None, train_on_fold: bool = False,
                  name: str = "fold") -> list[Split]:
    """Grouped k-fold cross-validation, deterministic for a ``seed``.

    Groups are dealt to folds so that folds hold as equal a number of *cases* as the group sizes allow,
    within each stratum (``stratify_by(case)``, e.g. the source group) separately: largest groups first,
    each to the fold with the fewest cases of its stratum so far (ties broken by the seeded shuffle).
    Normally fold k is the test set and the rest train; ``train_on_fold=True`` inverts this (train on one
    fold, test on the others: the papers' "4 training / 16 test" protocol).
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    groups, strata = _group_table(cases, stratify_by)
    if len(groups) < n_folds:
        raise ValueError(f"{len(groups)} groups cannot fill {n_folds} folds")
    rng = random.Random(seed)
    fold_groups: list[list[str]] = [[] for _ in range(n_folds)]
    load_total = [0] * n_folds
    for stratum in sorted({repr(s) for s in strata.values()}):
        members = [g for g in sorted(groups) if repr(strata[g]) == stratum]
        rng.shuffle(members)
        members.sort(key=lambda g: -len(groups[g]))  # stable: the shuffle breaks ties
        load = [0] * n_folds
        order = list(range(n_folds))
        rng.shuffle(order)
        for g in members:
            k = min(order, key=lambda f: (load[f], load_total[f]))
            fold_groups[k].append(g)
            load[k] += len(groups[g])
            load_total[k] += len(groups[g])
    splits = []
    for k in range(n_folds):
        fold_ids = tuple(i for g in sorted(fold_groups[k]) for i in groups[g])
        rest = tuple(i for j in range(n_folds) if j != k for g in sorted(fold_groups[j]) for i in groups[g])
        train, test = (fold_ids, rest) if train_on_fold else (rest, fold_ids)
        train_groups = sorted(fold_groups[k]) if train_on_fold else sorted(g for j in range(n_folds) if j != k
                                                                           for g in fold_groups[j])
        split = Split(name=f"{name}{k}", train=train, test=test,
                      meta={"fold": k, "seed": seed, "train_groups": train_groups})
        assert_disjoint(split, {c.id: c.group for c in cases})
        splits.append(split)
    return splits


def grouped_holdout(cases: Sequence[Case], fraction: float, seed: int = 0,
                    stratify_by: Callable[[Case], Any] | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split case ids into ``(kept, held_out)`` by groups, holding out about ``fraction`` of the cases
    (per stratum), deterministic for a ``seed``. At least one group is held out and one kept."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    groups, strata = _group_table(cases, stratify_by)
    if len(groups) < 2:
        raise ValueError("a hold-out split needs at least two groups")
    rng = random.Random(seed)
    held: list[str] = []
    for stratum in sorted({repr(s) for s in strata.values()}):
        members = [g for g in sorted(groups) if repr(strata[g]) == stratum]
        rng.shuffle(members)
        target = fraction * sum(len(groups[g]) for g in members)
        taken = 0
        for g in members:
            # greedy: take a group while below the target when it brings the held-out count no further from
            # it (ties round up, so a small validation set is not left empty)
            if taken < target and abs(taken + len(groups[g]) - target) <= abs(taken - target):
                held.append(g)
                taken += len(groups[g])
    if not held:
        held = [sorted(groups)[0]]
    if len(held) == len(groups):
        held = held[:-1]
    held_set = set(held)
    kept_ids = tuple(c.id for c in cases if c.group not in held_set)
    held_ids = tuple(c.id for c in cases if c.group in held_set)
    return kept_ids, held_ids


def with_validation(split: Split, cases: Sequence[Case], fraction: float, seed: int = 0) -> Split:
    """Move about ``fraction`` of the training cases (whole groups) into ``val`` (model selection /
    early stopping inside the training data, e.g. nCoVSegNet's quarter of the training data)."""
    train_cases = select(cases, split.train)
    kept, held = grouped_holdout(train_cases, fraction, seed)
    out = Split(name=split.name, train=kept, val=tuple(split.val) + held, test=split.test, notes=split.notes,
                meta={**split.meta, "val_fraction": fraction})
    # whole patients move to validation (grouped_holdout), but the test side keeps the protocol's own level
    assert_disjoint(out, protocol_groups(out, cases))
    return out


# ----------------------------------------------------------------------------------------------------------
# The papers' protocols
# ----------------------------------------------------------------------------------------------------------

def covid19ctseg_folds(cases: Sequence[Case] | None = None, split_file: str | None = None,
                       source: str = "published", seed: int = 0) -> list[Split]:
    """The 5-fold "4 training / 16 test volumes" protocol of 000/001/002 on COVID-19-CT-Seg.

    Args:
        cases: the data set's cases (:func:`training.datasets.read_covid19ctseg`); used to check that every
            listed case exists and, for ``generated``, to build the folds. Optional for ``published``.
        split_file: the benchmark's split file (``Task1_COVID_datasplit.pkl`` or another format that
            :func:`training.datasets.read_benchmark_split` reads); overrides ``source``.
        source: ``"published"`` - the benchmark's five folds as published; ``"generated"`` - the same shape
            (5 folds, each 2 coronacases + 2 Radiopaedia volumes for training, every volume trained on
            once) built by :func:`grouped_kfold` over *patients*, so that the two volumes of Radiopaedia
            patients 10 and 29 never sit on opposite sides.

    The published split is volume-disjoint but not patient-disjoint: folds 2 and 4 train on one volume of
    patients 10 and 29 and test on the other. It is kept as published because the papers' numbers come
    from it; each such fold carries a note and ``meta["disjoint"] = "case"``, so every check of it (here,
    :func:`with_validation`, the trainer) is at volume level (:func:`protocol_groups`): a patient-level
    check would stop the papers' protocol at fold 2.
    """
    if split_file is not None or source == "published":
        folds = read_benchmark_split(split_file) if split_file is not None else \
            [{"train": list(t), "test": []} for t in BENCHMARK_TASK1_TRAIN]
        all_ids = sorted({i for f in folds for i in f["train"] + f["test"]})
        if cases is not None:
            known = {c.id for c in cases}
            missing = [i for i in all_ids if i not in known]
            if missing:
                raise KeyError(f"split lists case(s) not in the data set: {', '.join(missing[:8])}")
            all_ids = sorted(known | set(all_ids))
        splits = []
        for k, f in enumerate(folds):
            train = tuple(f["train"])
            test = tuple(f["test"]) if f["test"] else tuple(i for i in all_ids if i not in set(train))
            train_patients = {group_of(i) for i in train}
            leaked = sorted(train_patients & {group_of(i) for i in test})
            notes = (f"patient(s) {', '.join(leaked)} have volumes in both train and test (as published)",) if leaked else ()
            split = Split(name=f"fold{k}", train=train, test=test, notes=notes,
                          meta={"fold": k, "protocol": "covid19ctseg_benchmark", "disjoint": DISJOINT_BY_CASE,
                                "source": str(split_file) if split_file else "published"})
            assert_disjoint(split, {i: i for i in train + test})
            splits.append(split)
        return splits
    if source != "generated":
        raise ValueError(f"unknown source {source!r}; use 'published' or 'generated'")
    if cases is None:
        raise ValueError("covid19ctseg_folds(source='generated') needs the cases")
    splits = grouped_kfold(cases, 5, seed=seed, stratify_by=lambda c: c.meta.get("source_group", c.id.split("_")[0]),
                           train_on_fold=True)
    return [Split(name=s.name, train=s.train, test=s.test, meta={**s.meta, "protocol": "covid19ctseg_generated"})
            for s in splits]


def _source_group(case: Case) -> str:
    """``coronacases`` or ``radiopaedia`` for a 2D COVID-19-CT-Seg slice: its reader's ``source_group``, else
    the shared data's numbering (groups 0-7 coronacases, 10-19 Radiopaedia)."""
    return case.meta.get("source_group") or ("coronacases" if int(case.group) < 10 else "radiopaedia")


def ctseg2d_protocol_folds(cases: Sequence[Case], n_train_groups: int = 4, n_folds: int = 2,
                           seed: int = 0) -> list[Split]:
    """The CPU protocol on the shared 2D COVID-19-CT-Seg slices: folds of 4 training and 14 test groups.

    The 18 volume groups are 8 coronacases (0-7) and 10 Radiopaedia groups (10-19) whose boundaries are
    approximate, so the Radiopaedia block must stay on one side of every split. It cannot be the training
    side (10 groups > 4), so the Radiopaedia groups are always test data and each fold's 4 training groups
    are drawn from the 8 coronacases groups; the other 4 coronacases groups join the 10 Radiopaedia groups
    in the test set (4 / 14, as the papers' 4 / 16 volumes; the shared data lacks 2 of the 20 volumes).

    With the default ``n_folds=2`` the coronacases groups are dealt (seeded shuffle) into two disjoint sets
    of 4: a true 2-fold cross-validation in which every coronacases group trains exactly once - the
    closest match to the benchmark, where every volume trains in exactly one fold. ``n_folds > 2`` (e.g. 5,
    the papers' fold count) repeats such partitions with new shuffles (repeated grouped CV), skipping any
    training set already used, so each group trains in ``n_folds / 2`` folds on average.
    """
    groups: dict[str, list[str]] = {}
    source_group: dict[str, str] = {}
    for c in cases:
        groups.setdefault(c.group, []).append(c.id)
        sg = _source_group(c)
        if source_group.setdefault(c.group, sg) != sg:
            raise ValueError(f"group {c.group} mixes coronacases and radiopaedia slices")
    corona = sorted((g for g in groups if source_group[g] == "coronacases"), key=lambda g: int(g))
    radio = sorted((g for g in groups if source_group[g] == "radiopaedia"), key=lambda g: int(g))
    if len(corona) < 2 * n_train_groups:
        raise ValueError(f"{len(corona)} coronacases groups cannot give two disjoint sets of {n_train_groups}")
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()
    chosen: list[tuple[str, ...]] = []
    attempts = 0
    while len(chosen) < n_folds:
        attempts += 1
        if attempts > 1000:
            raise ValueError(f"cannot make {n_folds} distinct training sets of {n_train_groups} groups")
        order = corona[:]
        rng.shuffle(order)
        for j in range(len(order) // n_train_groups):
            train_groups = tuple(sorted(order[j * n_train_groups:(j + 1) * n_train_groups], key=int))
            if train_groups not in seen and len(chosen) < n_folds:
                seen.add(train_groups)
                chosen.append(train_groups)
    mapping = {c.id: c.group for c in cases}
    splits = []
    for k, train_groups in enumerate(chosen):
        test_groups = [g for g in corona if g not in train_groups] + radio
        split = Split(name=f"fold{k}",
                      train=tuple(i for g in train_groups for i in groups[g]),
                      test=tuple(i for g in test_groups for i in groups[g]),
                      meta={"fold": k, "seed": seed, "protocol": "ctseg2d", "train_groups": list(train_groups),
                            "test_groups": test_groups})
        assert_disjoint(split, mapping)
        if any(g in train_groups for g in radio):  # pragma: no cover - by construction
            raise AssertionError("radiopaedia groups must stay together in the test set")
        splits.append(split)
    return splits


def ctseg2d_kfold(cases: Sequence[Case], n_folds: int = 3, seed: int = 0) -> list[Split]:
    """Grouped k-fold cross-validation on the shared 2D COVID-19-CT-Seg slices: every volume group is tested
    exactly once, by a model trained on the other folds.

    Units: each coronacases group (0-7) is one unit, and the Radiopaedia groups (10-19), whose boundaries
    are approximate, form **one** unit, so no Radiopaedia patient straddles a split. The units are dealt
    by :func:`grouped_kfold` (balanced by slice count). With the default 3 folds the Radiopaedia block
    fills most of one fold, so its groups are scored by a model trained on coronacases only, and the
    coronacases groups by models that also trained on Radiopaedia. Metrics stay per volume group
    (``eval.unit: group``): the unit only decides the split.
    """
    units = [replace(c, group="radiopaedia") if _source_group(c) == "radiopaedia" else c for c in cases]
    mapping = {c.id: c.group for c in cases}
    splits = []
    for split in grouped_kfold(units, n_folds, seed=seed):
        meta = {**split.meta, "protocol": "ctseg2d_kfold",
                "test_groups": sorted({mapping[i] for i in split.test}, key=int)}
        split = Split(name=split.name, train=split.train, test=split.test, meta=meta)
        assert_disjoint(split, mapping)
        splits.append(split)
    return splits


def medseg_train_val_test(train_pool: Sequence[Case], test_cases: Sequence[Case], val_fraction: float = 0.2,
                          seed: int = 0) -> Split:
    """004's protocol: 80 % of the MedSeg slices to train, 20 % to validate (model selection by validation
    loss), and a separate test set (004: 829 slices of the 9 MedSeg Radiopaedia volumes; on the CPU the
    Radiopaedia groups of the shared 2D set). MedSeg has no patient ids, so its slices are their own groups
    and the 80/20 split is by slice, as in the paper."""
    kept, held = grouped_holdout(train_pool, val_fraction, seed)
    split = Split(name="medseg_80_20", train=kept, val=held, test=tuple(c.id for c in test_cases),
                  meta={"protocol": "004", "seed": seed, "val_fraction": val_fraction})
    mapping = {**{c.id: f"{c.source}:{c.group}" for c in train_pool},
               **{c.id: f"{c.source}:{c.group}" for c in test_cases}}
    assert_disjoint(split, mapping)
    return split
