"""The model card of a registered version, in markdown and HTML, from the evidence in its audit bundle.

Every figure on the card is read from a file that rides in the same bundle (metrics.json, band.json,
the parity report, the dataset manifest, the registry tags, the audit events), so a reader can trace
each number to its source and ``kensa audit verify`` can check those sources.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from markdown_it import MarkdownIt

from kensa.registry import TAG_COST, TAG_KPI, TAG_REGISTERED_BY, TAG_SOURCE, TAG_STATUS

DECISIONS = ("model.approve", "model.reject", "model.rollback")
# Slices with fewer parts than this get a warning: their rates move by ≥ 1/n per part.
SMALL_SLICE = 30


@dataclass(frozen=True)
class CardEvidence:
    """What the card is made of; every field comes from a file in the bundle."""

    name: str
    version: str
    tags: dict[str, str]
    aliases: list[str]
    registered_at: str
    metadata: dict[str, Any]  # the ONNX file's decoded kensa metadata
    metrics: dict[str, Any] | None = None
    band: dict[str, Any] | None = None
    parity: dict[str, Any] | None = None
    dataset: dict[str, Any] | None = None  # .kensa-dataset.json without its records
    gate: dict[str, Any] | None = None  # the KPI gate of the run that registered it (or its pilot)
    events: list[dict[str, Any]] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)  # paths relative to the card


def _pct(value: Any) -> str:
    return f"{value:.2%}" if isinstance(value, int | float) and not isinstance(value, bool) else "n/a"


def _num(value: Any, fmt: str = ".4g") -> str:
    return format(value, fmt) if isinstance(value, int | float) and not isinstance(value, bool) else "n/a"


def _cell(value: Any) -> str:
    # Table cells: a pipe or a newline would break the markdown row.
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _json_tag(tags: dict[str, str], key: str) -> dict[str, Any]:
    try:
        value = json.loads(tags.get(key, "") or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _intended_use(ev: CardEvidence) -> list[str]:
    classes = ev.metadata.get("classes") or []
    size = ev.metadata.get("input_size", "?")
    card = (ev.dataset or {}).get("card") or {}
    lines = sorted(card.get("by_line") or {})
    cameras = sorted(card.get("by_camera") or {})
    out = [
        "## Intended use",
        "",
        f"Visual inspection of parts on the production line: one image of one part in, one verdict "
        f"out — `ok`, `defect:<type>` or `review` (a person decides). Input: RGB images, "
        f"{size}×{size} pixels, uint8, resized by the caller. Classes: "
        + ", ".join(f"`{c}`" for c in classes)
        + ".",
        "",
        "Parts whose defect score falls between the two thresholds go to a person; the model is "
        "meant to run with that review station staffed.",
    ]
    if lines or cameras:
        out += [
            "",
            "Validated for line(s) "
            + (", ".join(f"`{x}`" for x in lines) or "unknown")
            + " and camera(s) "
            + (", ".join(f"`{x}`" for x in cameras) or "unknown")
            + "; any other line, camera, product or lighting set-up needs its own evaluation.",
        ]
    out += [
        "",
        "Not intended for: safety-critical decisions without the review station, parts or "
        "defect types outside the classes above, or images from a different camera set-up.",
    ]
    return out


def _data(ev: CardEvidence) -> list[str]:
    out = ["## Data", ""]
    ds = ev.dataset
    trained_on = ev.metadata.get("dataset_version") or ev.tags.get("kensa.dataset_version", "")
    if ds is None:
        return [*out, f"Dataset version `{trained_on}`; its manifest was not included."]
    card = ds.get("card") or {}
    out.append(
        f"Dataset version `{ds.get('version')}` ({card.get('total', '?')} images, ingested "
        f"{ds.get('created_at', '?')}, source {ds.get('source', '?')}); the model was trained on "
        f"version `{trained_on}`. The full manifest (every image's SHA-256, label and split) is "
        "`data/kensa-dataset.json`."
    )
    by_cs = card.get("by_class_split") or {}
    if by_cs:
        splits = sorted({s for row in by_cs.values() for s in row})
        out += [
            "",
            *_table(["class", *splits], ([c, *(row.get(s, 0) for s in splits)] for c, row in by_cs.items())),
        ]
    return out


def _metrics(ev: CardEvidence) -> list[str]:
    m = ev.metrics
    out = ["## Metrics (test split)", ""]
    if m is None:
        return [*out, "No evaluation was recorded for this version."]
    out += _table(
        ["parts", "escape rate", "false reject rate", "automation rate", "accuracy", "error"],
        [
            [
                m.get("n"),
                _pct(m.get("escape_rate")),
                _pct(m.get("false_reject_rate")),
                _pct(m.get("automation_rate")),
                _pct(m.get("accuracy")),
                _pct(m.get("error")),
            ]
        ],
    )
    out += [
        "",
        "Escape rate = defective parts passed as ok / defective parts; false reject rate = "
        "good parts flagged / good parts; automation rate = parts decided without a person.",
    ]
    catch = m.get("defect_catch_rate") or {}
    if catch:
        out += ["", "### Per defect type (caught or sent to review)", ""]
        out += _table(["defect", "catch rate"], ([k, _pct(v)] for k, v in catch.items()))
    for key, values in (m.get("slices") or {}).items():
        out += ["", f"### Slice: {key}", ""]
        out += _table(
            ["value", "parts", "escape rate", "false reject rate", "automation rate", "accuracy"],
            (
                [
                    v,
                    s.get("n"),
                    _pct(s.get("escape_rate")),
                    _pct(s.get("false_reject_rate")),
                    _pct(s.get("automation_rate")),
                    _pct(s.get("accuracy")),
                ]
                for v, s in values.items()
            ),
        )
    return out


def _robustness(ev: CardEvidence) -> list[str]:
    rob = (ev.metrics or {}).get("robustness")
    out = ["## Robustness (shop-floor corruptions)", ""]
    if not rob:
        return [
            *out,
            "Not measured for this version: its behaviour under lighting, blur, noise and "
            "misalignment is unknown.",
        ]
    out.append(
        f"{rob.get('n_images', '?')} test parts under each corruption at severities "
        f"{rob.get('severities')}: mean error {_pct(rob.get('corrupted_error'))} and mean escape rate "
        f"{_pct(rob.get('corrupted_escape_rate'))} (clean: {_pct((rob.get('clean') or {}).get('error'))}"
        f" and {_pct((rob.get('clean') or {}).get('escape_rate'))})."
    )
    rce = rob.get("relative_ce") or {}
    gaps = rob.get("error_gap") or {}
    rows = [[name, _pct(gap), _num(rce.get(name), ".2f")] for name, gap in gaps.items()]
    if rows:
        ref = rob.get("reference") or "none"
        out += [
            "",
            *_table(
                [
                    "corruption",
                    "error gap vs clean (mean over severities)",
                    f"relative CE (reference: {ref})",
                ],
                rows,
            ),
        ]
    return out


def _thresholds(ev: CardEvidence) -> list[str]:
    band = ev.band or ev.metadata.get("band") or {}
    t = ev.metadata.get("thresholds") or {}
    out = ["## Thresholds and their guarantee", ""]
    if not t:
        return [*out, "No thresholds recorded."]
    alpha, delta = t.get("alpha"), t.get("delta")
    out += _table(
        ["t_ok", "t_defect", "α (max escape rate)", "δ", "guaranteed"],
        [
            [
                _num(t.get("t_ok")),
                _num(t.get("t_defect")),
                _pct(alpha),
                _num(delta),
                "yes" if t.get("guaranteed") else "no",
            ]
        ],
    )
    out.append("")
    if t.get("guaranteed") and isinstance(delta, int | float):
        out.append(
            f"With probability at least {1 - delta:.0%} over the calibration draw, the escape rate on "
            f"new parts from the same distribution is at most {_pct(alpha)}, and the false reject "
            f"rate at most {_pct(band.get('max_false_reject'))} (Learn-then-Test, exact binomial)."
        )
    else:
        out.append(
            "**Not guaranteed**: "
            + str(
                band.get("message")
                or "the calibration split was "
                "too small to certify the targets; treat the band as uncalibrated."
            )
        )
    if band:
        out.append(
            f"Calibrated on {band.get('n_defective', '?')} defective and {band.get('n_good', '?')} "
            f"good parts (needed: {band.get('n_defective_needed', '?')} and "
            f"{band.get('n_good_needed', '?')}); on calibration: escape {_pct(band.get('escape_rate'))}, "
            f"false reject {_pct(band.get('false_reject_rate'))}, automation "
            f"{_pct(band.get('automation_rate'))}."
        )
    out.append("Thresholds are governed: changing them makes a new model version.")
    return out


def _cost_and_parity(ev: CardEvidence) -> list[str]:
    cost = _json_tag(ev.tags, TAG_COST)
    out = ["## Cost", ""]
    if cost:
        cur = cost.get("currency", "")
        out += _table(
            ["training", "serving per million parts", "TCO over planned life"],
            [
                [
                    f"{_num(cost.get('training'), '.3f')} {cur}",
                    f"{_num(cost.get('serving_per_million'), '.3f')} {cur}",
                    f"{_num(cost.get('tco'), '.2f')} {cur}",
                ]
            ],
        )
    else:
        out.append("No cost was recorded at registration.")
    p = ev.parity
    out += ["", "## Export parity (ONNX Runtime vs PyTorch)", ""]
    if p:
        out.append(
            f"{p.get('n_images', '?')} images: max |Δp| {_num(p.get('max_abs_prob_diff'), '.2e')} "
            f"(tolerance {_num(p.get('tolerance'), '.0e')}), verdict agreement "
            f"{_pct(p.get('verdict_agreement'))}, {'passed' if p.get('passed') else 'FAILED'}."
        )
    else:
        out.append("No parity report was recorded.")
    return out


def _governance(ev: CardEvidence) -> list[str]:
    kpi = _json_tag(ev.tags, TAG_KPI)
    out = ["## Registration and approvals", ""]
    out.append(
        f"Registered {ev.registered_at} by `{ev.tags.get(TAG_REGISTERED_BY, '?')}` from "
        f"`{ev.tags.get(TAG_SOURCE, '?')}`; status `{ev.tags.get(TAG_STATUS, '?')}`"
        + (f"; aliases {', '.join(ev.aliases)}" if ev.aliases else "")
        + "."
    )
    if kpi:
        out.append(f"KPI recorded at registration: `{json.dumps(kpi, sort_keys=True)}`.")
    if ev.gate:
        out += ["", "KPI gate: " + ("passed" if ev.gate.get("passed") else "failed"), ""]
        out += _table(
            ["KPI", "target", "achieved", "passed"],
            (
                [r.get("kpi"), r.get("target"), r.get("achieved"), "yes" if r.get("passed") else "no"]
                for r in ev.gate.get("rows", [])
            ),
        )
    decisions = [e for e in ev.events if e.get("action") in DECISIONS]
    out.append("")
    if decisions:
        # Events on other versions that retired this one (a later approval, a rollback) are listed
        # too: they are part of this version's history.
        out += _table(
            ["when (UTC)", "who", "role", "decision", "on", "reason"],
            (
                [
                    e.get("created_at"),
                    e.get("actor"),
                    (e.get("details") or {}).get("role", ""),
                    e.get("action"),
                    str(e.get("subject", "")).removeprefix("model:"),
                    (e.get("details") or {}).get("reason", ""),
                ]
                for e in decisions
            ),
        )
    else:
        out.append("No approval decision has been recorded for this version.")
    return out


def _limitations(ev: CardEvidence) -> list[str]:
    notes: list[str] = []
    t = ev.metadata.get("thresholds") or {}
    if not t.get("guaranteed"):
        notes.append("The review band carries no statistical guarantee (too few calibration parts).")
    m = ev.metrics or {}
    for key, values in (m.get("slices") or {}).items():
        small = [v for v, s in values.items() if isinstance(s.get("n"), int) and s["n"] < SMALL_SLICE]
        if small:
            notes.append(
                f"Slice `{key}` values {', '.join(small)} have fewer than {SMALL_SLICE} test "
                "parts; their rates are rough."
            )
    if not m.get("robustness"):
        notes.append("Robustness to shop-floor corruptions was not measured.")
    if m and m.get("dataset_version") != m.get("trained_on_dataset_version"):
        notes.append("Evaluated on a different dataset version than it was trained on.")
    source = (ev.dataset or {}).get("source", "")
    if "synthetic" in str(source):
        notes.append("Trained and evaluated on synthetic images; validate on real parts before use.")
    notes += [
        "Guarantees hold for parts drawn like the calibration set; lighting, camera or product "
        "changes void them — drift monitoring watches for that.",
        "A defect type absent from the training data will not be recognised as such.",
    ]
    return ["## Limitations", "", *(f"- {n}" for n in notes)]


def render_markdown(ev: CardEvidence) -> str:
    """The card as markdown (plots referenced by their paths in the bundle)."""
    arch = ev.metadata.get("model_name", "?")
    parts: list[str] = [
        f"# Model card: {ev.name} version {ev.version}",
        "",
        f"Architecture `{arch}`, kensa code version `{ev.tags.get('kensa.code_version', '?')}`, "
        f"ONNX SHA-256 `{ev.tags.get('kensa.onnx_sha256', '?')}`.",
        "",
    ]
    for section in (
        _intended_use,
        _data,
        _metrics,
        _robustness,
        _thresholds,
        _cost_and_parity,
        _governance,
        _limitations,
    ):
        parts += [*section(ev), ""]
    if ev.plots:
        parts += ["## Plots", ""]
        parts += [f"![{p.rsplit('/', 1)[-1]}]({p})" for p in ev.plots]
        parts.append("")
    return "\n".join(parts)


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;"
    "color:#222}table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;"
    "padding:.2rem .5rem;text-align:right}th{background:#f4f4f4}code{background:#f4f4f4}"
    "img{max-width:100%;display:block;margin:1rem 0}"
)


def render_html(ev: CardEvidence) -> str:
    """The same card as a standalone HTML page (markdown rendered with raw HTML disabled)."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    body = md.render(render_markdown(ev))
    title = html.escape(f"Model card: {ev.name} version {ev.version}")
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_CSS}</style></head><body>\n{body}</body></html>\n"
    )
