"""Deterministic train/calibration/test splits, grouped by part and stratified by label."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kensa.models.data.validate import SPLITS, Problem


@dataclass(frozen=True)
class SplitItem:
    """One image as the splitter sees it; ``split`` is set where the manifest fixed it."""

    key: str
    label: str
    sha256: str
    part_id: str | None = None
    split: str | None = None


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class _Group:
    members: list[int]
    label: str
    fixed: str | None


def _groups(items: Sequence[SplitItem]) -> list[_Group]:
    """Images that must share a split: same part id, or identical content (no duplicate leaks)."""
    uf = _UnionFind(len(items))
    first_with: dict[tuple[str, str], int] = {}
    for i, item in enumerate(items):
        keys = [("sha", item.sha256)] + ([("part", item.part_id)] if item.part_id else [])
        for key in keys:
            if key in first_with:
                uf.union(first_with[key], i)
            else:
                first_with[key] = i
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(len(items)):
        members[uf.find(i)].append(i)
    groups = []
    for idx in members.values():
        idx.sort(key=lambda i: items[i].key)
        labels = Counter(items[i].label for i in idx)
        # Majority label stratifies the group; ties go to the alphabetically first for determinism.
        label = max(sorted(labels), key=lambda lab: labels[lab])
        fixed = sorted({items[i].split for i in idx} - {None}, key=SPLITS.index)
        # Conflicting fixed splits are a leak reported by validation; pick one to keep going.
        groups.append(_Group(idx, label, fixed[0] if fixed else None))
    groups.sort(key=lambda g: items[g.members[0]].key)
    return groups


def _assign_stratum(groups: list[_Group], fractions: Sequence[float], rng: random.Random) -> dict[int, str]:
    """Give each free group of one label a split, filling the split furthest below its target."""
    counts = Counter({s: 0 for s in SPLITS})
    for g in groups:
        if g.fixed is not None:
            counts[g.fixed] += len(g.members)
    total = sum(len(g.members) for g in groups)
    targets = {s: f * total for s, f in zip(SPLITS, fractions, strict=True)}
    free = [g for g in groups if g.fixed is None]
    rng.shuffle(free)
    chosen: dict[int, str] = {}

    def put(g: _Group, split: str) -> None:
        chosen[id(g)] = split
        counts[split] += len(g.members)

    # First make sure every split sees this class, smallest splits first and with the smallest
    # groups, so that the guarantee costs the proportions as little as possible.
    for split in reversed(SPLITS):
        if counts[split] == 0 and free:
            smallest = min(free, key=lambda g: len(g.members))
            free.remove(smallest)
            put(smallest, split)
    # Largest groups first: greedy filling by deficit balances better that way. The sort is
    # stable, so equal-sized groups keep their seeded shuffle order.
    for g in sorted(free, key=lambda g: -len(g.members)):
        best = max(SPLITS, key=lambda s: (targets[s] - counts[s], -SPLITS.index(s)))
        put(g, best)
    return chosen


def assign_splits(items: Sequence[SplitItem], fractions: Sequence[float], seed: int) -> list[str]:
    """The split of each item (same order as ``items``).

    Deterministic for a given seed and set of items, whatever order they come in. Splits
    fixed by the manifest are kept; a whole part follows any fixed split among its images.
    """
    order = sorted(range(len(items)), key=lambda i: items[i].key)
    ordered = [items[i] for i in order]
    by_label: dict[str, list[_Group]] = defaultdict(list)
    for g in _groups(ordered):
        by_label[g.label].append(g)

    split_of: list[str] = [""] * len(ordered)
    for label in sorted(by_label):
        # A string seed is hashed stably (not via PYTHONHASHSEED), so runs agree across processes.
        rng = random.Random(f"{seed}:{label}")
        chosen = _assign_stratum(by_label[label], fractions, rng)
        for g in by_label[label]:
            split = g.fixed if g.fixed is not None else chosen[id(g)]
            for i in g.members:
                split_of[i] = split

    result: list[str] = [""] * len(items)
    for pos, original in enumerate(order):
        result[original] = split_of[pos]
    return result


def anomaly_splits(items: Sequence[SplitItem], splits: Sequence[str]) -> list[str]:
    """Splits for a model that learns from good parts only: a part with a defective image never
    trains. Parts drawn for training that hold one move, whole, to calibration (where they
    certify the escape rate) and test, alternately; splits the manifest fixed are kept.
    """
    out = list(splits)
    turn = 0
    for g in sorted(_groups(items), key=lambda g: min(items[i].key for i in g.members)):
        moving = g.fixed is None and any(items[i].label != "ok" and out[i] == "train" for i in g.members)
        if moving:
            for i in g.members:
                out[i] = ("calibration", "test")[turn % 2]
            turn += 1
    return out


def check_split_coverage(
    items: Sequence[SplitItem], splits: Sequence[str], labels: Iterable[str]
) -> list[Problem]:
    """An error for each of ``labels`` that has no image in some split."""
    present: dict[str, set[str]] = defaultdict(set)
    for item, split in zip(items, splits, strict=True):
        present[item.label].add(split)
    groups = _groups(items)
    n_groups = Counter(label for g in groups for label in {items[i].label for i in g.members})
    problems = []
    for label in sorted(set(labels)):
        for split in SPLITS:
            if split in present[label]:
                continue
            problems.append(
                Problem(
                    "class_missing_from_split",
                    f"class {label!r} has no image in split {split!r}; every class needs images "
                    f"in {', '.join(SPLITS)}. Its images belong to {n_groups[label]} part(s) "
                    "(one part never spans two splits) or to splits fixed by the manifest: add "
                    "images of more parts or change the manifest's split column",
                    f"{label}/",
                )
            )
    return problems


def carve_validation(items: Sequence[SplitItem], fraction: float, seed: int) -> list[bool]:
    """Which items of a training split become its validation part (same order as ``items``).

    Grouped like the splits (a part and its duplicates stay together) and stratified by label,
    with every label that has two or more groups represented, so the epoch a run keeps is chosen
    on data that neither trained it nor calibrates its review band.
    """
    order = sorted(range(len(items)), key=lambda i: items[i].key)
    ordered = [items[i] for i in order]
    by_label: dict[str, list[_Group]] = defaultdict(list)
    for g in _groups(ordered):
        by_label[g.label].append(g)
    chosen = [False] * len(ordered)
    for label in sorted(by_label):
        groups = by_label[label]
        if len(groups) < 2:
            continue  # its only part must stay in training
        rng = random.Random(f"{seed}:validation:{label}")
        rng.shuffle(groups)
        target = fraction * sum(len(g.members) for g in groups)
        taken = 0
        for g in groups[:-1]:  # never all of a label's groups
            if taken and taken + len(g.members) / 2 > target:
                break
            for i in g.members:
                chosen[i] = True
            taken += len(g.members)
    result = [False] * len(items)
    for pos, original in enumerate(order):
        result[original] = chosen[pos]
    return result
