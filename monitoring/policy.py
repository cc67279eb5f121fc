"""The drift policy: one statistic per window, with levels set by a false-alarm budget, not p < 0.05.

The window statistic ``T`` is the largest of a set of standardised shift components, each close to
N(0, 1) when the window comes from the reference distribution:

* per scalar column (image statistics, defect score, margin, entropy): the shift of the mean and
  the shift of the log standard deviation;
* on the embedding (each dimension scaled to unit variance on the reference): a Hotelling-style
  mean shift (turned into a z-score with Wilson–Hilferty) and the shift of the mean squared
  radius (spread, outliers).

The null distribution of ``T`` is bootstrapped from the reference: every replicate resamples a
reference *and* a window from the reference rows, so the reference's own sampling error is part of
the null (a small reference gives wider, honest limits). With ``stride`` parts between evaluated
windows, a budget of ``b`` false alarms per 10,000 parts allows each window a false-alarm
probability ``alpha = b * stride / 10000``; counting every alarming window as a separate alarm is
conservative, because consecutive overlapping windows share their parts and alarm together.
``warning`` sits at ``1 - alpha`` of the null, ``critical`` at ``1 - alpha / critical_factor``;
quantiles beyond the bootstrap's reach come from an exponential fit to its upper tail.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kensa.monitoring.features import SCALAR_COLUMNS, FeatureTable

LEVELS: tuple[str, ...] = ("none", "warning", "critical")


@dataclass(frozen=True)
class Component:
    """One standardised shift component of a window, for people: what moved and how much."""

    name: str  # e.g. "brightness: mean", "embedding: mean shift"
    z: float


@dataclass(frozen=True)
class WindowScore:
    """The policy's verdict on one window."""

    score: float  # T, the largest standardised component
    level: str  # none | warning | critical
    p_value: float  # share of bootstrap null windows with T at least this large (≥ 1/B)
    warning: float
    critical: float
    n: int
    components: list[Component] = field(default_factory=list)

    def top(self, k: int = 5) -> list[Component]:
        """The ``k`` components that moved most (largest |z|)."""
        return sorted(self.components, key=lambda c: -abs(c.z))[:k]

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": round(self.score, 4),
            "level": self.level,
            "p_value": self.p_value,
            "warning": round(self.warning, 4),
            "critical": round(self.critical, 4),
            "n": self.n,
            "top": [{"name": c.name, "z": round(c.z, 3)} for c in self.top(8)],
        }


def _component_names(k: int) -> list[str]:
    names = [f"{c}: mean" for c in SCALAR_COLUMNS] + [f"{c}: spread" for c in SCALAR_COLUMNS]
    if k:
        names += ["embedding: mean shift", "embedding: spread"]
    return names


@dataclass
class _Basis:
    """Reference moments every window is compared with (fitted once on the reference rows)."""

    mean: np.ndarray  # (d,) scalar means
    sd: np.ndarray  # (d,) scalar standard deviations (floored)
    kurt: np.ndarray  # (d,) kurtosis of the standardised scalars (for the spread component)
    emb_mean: np.ndarray  # (k,)
    whiten: np.ndarray  # (k, k'): (e - emb_mean) @ whiten has unit variance per kept dimension
    rad_mean: float
    rad_sd: float
    n: int

    @classmethod
    def fit(cls, table: FeatureTable) -> _Basis:
        x = table.scalars
        mean = x.mean(axis=0)
        # A constant column (e.g. a camera that never changes colour) must not divide by zero; a
        # change in it is then measured in units of 1e-6 of its value, i.e. "any change".
        sd = np.maximum(x.std(axis=0, ddof=1), 1e-6 * np.maximum(np.abs(mean), 1.0))
        z = (x - mean) / sd
        kurt = np.maximum((z**4).mean(axis=0), 1.5)
        e = table.embedding
        k = e.shape[1]
        if k:
            # Per-dimension scaling, not full whitening: the ONNX features are PCA coordinates
            # (close to uncorrelated already), and a covariance fitted on a small reference
            # would make fresh windows look more spread than the reference rows it was fitted
            # on (an in-sample bias of about k/n in the radius that the bootstrap cannot see).
            emb_mean = e.mean(axis=0)
            emb_sd = e.std(axis=0, ddof=1)
            # Dimensions with almost no variance on the reference would turn rounding noise into
            # huge z-scores: leave them out.
            keep = emb_sd > max(float(emb_sd.max()), 1e-12) * 1e-3
            whiten = np.diag(1.0 / np.where(keep, emb_sd, 1.0))[:, keep]
            u = (e - emb_mean) @ whiten
            rad = (u**2).mean(axis=1)
            rad_mean, rad_sd = float(rad.mean()), float(max(rad.std(ddof=1), 1e-6))
        else:
            emb_mean, whiten, rad_mean, rad_sd = np.zeros(0), np.zeros((0, 0)), 0.0, 1.0
        return cls(mean, sd, kurt, emb_mean, whiten, rad_mean, rad_sd, len(x))

    def moments(self, table: FeatureTable) -> np.ndarray:
        """Per-row quantities whose window means define every component: (N, 2d + k' + 1)."""
        z = (table.scalars - self.mean) / self.sd
        parts = [z, z**2]
        if self.whiten.shape[1]:
            u = (table.embedding - self.emb_mean) @ self.whiten
            parts += [u, ((u**2).mean(axis=1, keepdims=True) - self.rad_mean) / self.rad_sd]
        return np.concatenate(parts, axis=1)

    def loo_moments(self, table: FeatureTable) -> np.ndarray:
        """``moments`` of the reference rows, each standardised without itself (leave-one-out).

        A fresh part is standardised with a mean and scale that never saw it; a reference row
        standardised with moments that include it looks slightly closer to the centre. Leaving
        each row out makes the reference rows look like fresh parts, so the bootstrap (which
        resamples these rows) sees the same null as the windows it will judge.
        """
        z = _loo_standardise(table.scalars, self.sd)
        parts = [z, z**2]
        if self.whiten.shape[1]:
            keep = np.abs(self.whiten).sum(axis=1) > 0
            sd = 1.0 / np.abs(self.whiten[keep]).sum(axis=1)
            u = _loo_standardise(table.embedding[:, keep], sd)
            parts += [u, ((u**2).mean(axis=1, keepdims=True) - self.rad_mean) / self.rad_sd]
        return np.concatenate(parts, axis=1)

    def components(self, win: np.ndarray, ref: np.ndarray, w: int | np.ndarray) -> np.ndarray:
        """Raw components from window means ``win`` and reference means ``ref`` (B, M) each."""
        d = len(self.mean)
        scale = np.sqrt(1.0 / np.asarray(w, dtype=np.float64) + 1.0 / self.n)
        scale = scale.reshape(-1, 1) if np.ndim(scale) else scale
        loc = (win[:, :d] - ref[:, :d]) / scale
        var_w = np.maximum(win[:, d : 2 * d] - win[:, :d] ** 2, 1e-12)
        var_r = np.maximum(ref[:, d : 2 * d] - ref[:, :d] ** 2, 1e-12)
        # Var(log sd) ≈ (kurtosis − 1) / (4 n) for a sample of size n.
        spread = 0.5 * np.log(var_w / var_r) / (scale * np.sqrt((self.kurt - 1.0) / 4.0))
        out = [loc, spread]
        k = self.whiten.shape[1]
        if k:
            diff = win[:, 2 * d : 2 * d + k] - ref[:, 2 * d : 2 * d + k]
            chi2 = (diff**2).sum(axis=1) / (np.ravel(scale) ** 2 if np.ndim(scale) else scale**2)
            # Wilson–Hilferty: (chi2/k)^(1/3) is close to normal, so the Hotelling shift joins the
            # other components on the same z scale.
            wh = ((chi2 / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
            rad = (win[:, -1] - ref[:, -1]) / np.ravel(scale)
            out += [wh.reshape(-1, 1), rad.reshape(-1, 1)]
        return np.concatenate(out, axis=1)


@dataclass
class DriftPolicy:
    """A calibrated policy for one reference (one line/camera subset) and one window design."""

    basis: _Basis
    null_sd: np.ndarray  # (M,) bootstrap sd of each raw component, to put all on one z scale
    null_center: np.ndarray  # (M,) bootstrap median of each raw component
    null_scores: np.ndarray  # (B,) sorted bootstrap null values of T
    ref_means: np.ndarray  # (M',) reference means of the per-row moments (leave-one-out)
    warning: float
    critical: float
    window: int
    stride: int
    false_alarm_per_10k: float
    critical_factor: float
    names: list[str]

    @property
    def alpha_warning(self) -> float:
        return window_alpha(self.false_alarm_per_10k, self.stride)

    def thresholds(self, parts: int | None = None) -> tuple[float, float]:
        """(warning, critical) for a window that accounts for ``parts`` new parts of the budget.

        Count windows account for ``stride`` parts (the default); a time window for all of its
        parts. The null sample was drawn for ``window``-part windows, which the components'
        per-size scaling makes a close approximation for other sizes.
        """
        if parts is None or parts == self.stride:
            return self.warning, self.critical
        alpha = window_alpha(self.false_alarm_per_10k, parts)
        warning = upper_quantile(self.null_scores, alpha)
        return warning, max(upper_quantile(self.null_scores, alpha / self.critical_factor), warning)

    def score(self, table: FeatureTable, *, parts: int | None = None) -> WindowScore:
        """Score one window (rows with a missing value are left out); see ``thresholds``."""
        rows = table.take(table.complete_rows())
        n = len(rows)
        if n < 2:
            raise ValueError(f"a drift window needs at least 2 complete rows; got {n}")
        m = self.basis.moments(rows).mean(axis=0, keepdims=True)
        raw = self.basis.components(m, self.ref_means[None, :], n)[0]
        z = (raw - self.null_center) / self.null_sd
        stat = float(_statistic(z[None, :])[0])
        warning, critical = self.thresholds(parts)
        level = "critical" if stat >= critical else "warning" if stat >= warning else "none"
        exceed = int(len(self.null_scores) - np.searchsorted(self.null_scores, stat, side="left"))
        p = max(exceed, 1) / len(self.null_scores)
        comps = [Component(name, float(v)) for name, v in zip(self.names, z, strict=True)]
        return WindowScore(stat, level, p, warning, critical, n, comps)

    def describe(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "stride": self.stride,
            "false_alarm_per_10k": self.false_alarm_per_10k,
            "alpha_warning": self.alpha_warning,
            "alpha_critical": self.alpha_warning / self.critical_factor,
            "warning": round(self.warning, 4),
            "critical": round(self.critical, 4),
            "n_reference": self.basis.n,
            "n_bootstrap": len(self.null_scores),
        }


def _loo_standardise(x: np.ndarray, floor_sd: np.ndarray) -> np.ndarray:
    """(x_i − mean without i) / (sd without i), column by column; x (n, d)."""
    n = len(x)
    mean = x.mean(axis=0)
    ss = ((x - mean) ** 2).sum(axis=0)
    mean_loo = (n * mean - x) / (n - 1)
    ss_loo = np.maximum(ss - (x - mean) ** 2 * n / (n - 1), 0.0)
    sd_loo = np.maximum(np.sqrt(ss_loo / (n - 2)), np.minimum(floor_sd, 1e-6 * np.abs(mean) + 1e-12))
    return (x - mean_loo) / sd_loo


def _statistic(z: np.ndarray) -> np.ndarray:
    # Mean and spread components are two-sided; the Hotelling z (second-last when present) can only
    # signal drift when large, so its negative side is not evidence.
    return np.abs(z).max(axis=1)


def window_alpha(false_alarm_per_10k: float, stride: int) -> float:
    """Per-window false-alarm probability that spends the budget with one window every ``stride``."""
    return min(0.5, false_alarm_per_10k * stride / 10_000.0)


def upper_quantile(sorted_null: np.ndarray, alpha: float) -> float:
    """The ``1 - alpha`` quantile of a sorted sample; beyond its reach, an exponential tail fit."""
    b = len(sorted_null)
    if alpha * b >= 50:
        return float(np.quantile(sorted_null, 1.0 - alpha))
    # Peaks over threshold with an exponential tail: the max of near-Gaussian components has a
    # lighter tail than exponential, so the extrapolated threshold errs on the high (safe) side.
    m = max(50, int(0.02 * b))
    u = float(sorted_null[-m - 1])
    beta = float(np.mean(sorted_null[-m:] - u))
    return u + max(beta, 1e-9) * math.log((m / b) / alpha)


def calibrate(
    reference: FeatureTable,
    *,
    window: int,
    stride: int,
    false_alarm_per_10k: float = 1.0,
    critical_factor: float = 20.0,
    n_boot: int = 20_000,
    seed: int = 0,
) -> DriftPolicy:
    """Bootstrap the null distribution of ``T`` for windows of ``window`` parts and set levels."""
    if window < 2 or stride < 1:
        raise ValueError(f"window must be ≥ 2 and stride ≥ 1; got window={window}, stride={stride}")
    ref = reference.take(reference.complete_rows())
    n = len(ref)
    if n < 20:
        raise ValueError(f"a reference needs at least 20 complete rows to calibrate; got {n}")
    basis = _Basis.fit(ref)
    moments = basis.loo_moments(ref)  # (n, M')
    rng = np.random.default_rng(seed)
    raw_chunks = []
    p = np.full(n, 1.0 / n)
    chunk = max(1, min(n_boot, 4_000_000 // max(n, 1)))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        # Counts of each reference row in a resampled window / reference: means are matmuls.
        win = rng.multinomial(window, p, size=b) @ moments / window
        refm = rng.multinomial(n, p, size=b) @ moments / n
        raw_chunks.append(basis.components(win, refm, window))
    raw = np.concatenate(raw_chunks)
    center = np.median(raw, axis=0)
    # Robust spread (IQR / 1.349): a few extreme replicates should not loosen every threshold.
    q75, q25 = np.percentile(raw, [75, 25], axis=0)
    null_sd = np.maximum((q75 - q25) / 1.349, 1e-9)
    null_scores = np.sort(_statistic((raw - center) / null_sd))
    alpha = window_alpha(false_alarm_per_10k, stride)
    warning = upper_quantile(null_scores, alpha)
    critical = max(upper_quantile(null_scores, alpha / critical_factor), warning)
    return DriftPolicy(
        basis=basis,
        null_sd=null_sd,
        null_center=center,
        null_scores=null_scores,
        ref_means=moments.mean(axis=0),
        warning=warning,
        critical=critical,
        window=window,
        stride=stride,
        false_alarm_per_10k=false_alarm_per_10k,
        critical_factor=critical_factor,
        names=_component_names(ref.embedding.shape[1]),
    )


def save_policy(policy: DriftPolicy, path: Path) -> Path:
    """Write a calibrated policy (a few hundred kB) so a later check need not re-bootstrap."""
    b = policy.basis
    meta = {
        "warning": policy.warning,
        "critical": policy.critical,
        "window": policy.window,
        "stride": policy.stride,
        "false_alarm_per_10k": policy.false_alarm_per_10k,
        "critical_factor": policy.critical_factor,
        "names": policy.names,
        "rad": [b.rad_mean, b.rad_sd],
        "n": b.n,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(
        tmp,
        mean=b.mean,
        sd=b.sd,
        kurt=b.kurt,
        emb_mean=b.emb_mean,
        whiten=b.whiten,
        null_sd=policy.null_sd,
        null_center=policy.null_center,
        null_scores=policy.null_scores,
        ref_means=policy.ref_means,
        meta=np.array(json.dumps(meta)),
    )
    tmp.replace(path)
    return path


def load_policy(path: Path) -> DriftPolicy:
    """Read a policy written by ``save_policy``."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        basis = _Basis(
            mean=z["mean"],
            sd=z["sd"],
            kurt=z["kurt"],
            emb_mean=z["emb_mean"],
            whiten=z["whiten"],
            rad_mean=float(meta["rad"][0]),
            rad_sd=float(meta["rad"][1]),
            n=int(meta["n"]),
        )
        return DriftPolicy(
            basis=basis,
            null_sd=z["null_sd"],
            null_center=z["null_center"],
            null_scores=z["null_scores"],
            ref_means=z["ref_means"],
            warning=float(meta["warning"]),
            critical=float(meta["critical"]),
            window=int(meta["window"]),
            stride=int(meta["stride"]),
            false_alarm_per_10k=float(meta["false_alarm_per_10k"]),
            critical_factor=float(meta["critical_factor"]),
            names=list(meta["names"]),
        )
