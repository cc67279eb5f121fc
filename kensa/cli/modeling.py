"""`kensa train`, `kensa evaluate`, `kensa export`: thin commands over models/."""

from __future__ import annotations

import json
import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from kensa.cli.common import ExitCode, console, fail, get_settings


class FitChoice(StrEnum):
    """How a photo becomes the square model input (``kensa.models.data.imageprep``)."""

    LETTERBOX = "letterbox"
    ROI = "roi"
    SQUASH = "squash"


class FinetuneChoice(StrEnum):
    """How much of a pretrained model trains (``TrainConfig.finetune``), cheapest first."""

    HEAD = "head"
    LAST = "last"
    ALL = "all"


class Device(StrEnum):
    """Where training runs (``TrainConfig.device``); under torchrun each rank takes its own GPU."""

    CPU = "cpu"
    CUDA = "cuda"


def train_cmd(
    data: Annotated[Path, typer.Option("--data", help="Ingested dataset folder.")],
    out: Annotated[Path, typer.Option("--out", help="Run directory to write.")],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="Zoo model name (`kensa backbones list`), or patchcore: learn from the good "
            "parts alone (anomaly model, no training epochs).",
        ),
    ] = "efficientnet_lite0",
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 5,
    fraction: Annotated[float, typer.Option("--fraction", help="Share of the training split.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: Annotated[Device, typer.Option("--device", help="cpu or cuda.")] = Device.CPU,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    lr: Annotated[float, typer.Option("--lr")] = 2e-3,
    weights: Annotated[Path | None, typer.Option("--weights", help="Local pretrained weights file.")] = None,
    max_minutes: Annotated[float | None, typer.Option("--max-minutes", help="Wall-clock budget.")] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            "--image-size",
            help="Model input side in px: 32-384 (128-384 for real parts). Default: the dataset's own.",
        ),
    ] = None,
    fit: Annotated[
        FitChoice | None,
        typer.Option(
            "--fit",
            help="letterbox: keep the aspect, pad with grey (default); roi: crop --roi first, then "
            "letterbox; squash: stretch to a square (the old recipe).",
        ),
    ] = None,
    roi: Annotated[
        str | None,
        typer.Option("--roi", help="Region of interest x0,y0,x1,y1 as fractions 0-1 (implies --fit roi)."),
    ] = None,
    finetune: Annotated[
        FinetuneChoice | None,
        typer.Option(
            "--finetune",
            help="For a pretrained model (efficientnet_lite0, mobilenet_v2): head (frozen backbone, "
            "cached maps; default), last (also the stride-16 stages), all. From-scratch models: all.",
        ),
    ] = None,
) -> None:
    """Train a zoo model on an ingested dataset; writes RUN_DIR/checkpoint.pt."""
    from kensa.models.data.imageprep import parse_roi
    from kensa.models.data.ingest import DatasetError
    from kensa.models.nets.backbones import BackboneError
    from kensa.models.nets.zoo import UnknownModelError
    from kensa.models.train.feature_cache import feature_cache_dir
    from kensa.models.train.trainer import TrainConfig, train

    try:
        box = parse_roi(roi)
    except ValueError as exc:
        raise fail(f"--roi: {exc}") from None
    chosen = fit or (FitChoice.ROI if box is not None else FitChoice.LETTERBOX)
    if model == "patchcore":
        _fit_anomaly(data, out, image_size, chosen.value, seed)
        return
    config = TrainConfig(
        model=model,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        fraction=fraction,
        seed=seed,
        device=device.value,
        weights=str(weights) if weights else None,
        max_minutes=max_minutes,
        image_size=image_size,
        fit=chosen.value,
        roi=box,
        finetune=finetune.value if finetune else None,
    )
    try:
        result = train(data, config, out, cache_dir=feature_cache_dir(get_settings()))
    except (UnknownModelError, ValueError, FileNotFoundError, DatasetError, BackboneError) as exc:
        raise fail(str(exc)) from None
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 alone reports (and alone wrote the checkpoint)
    table = Table(title=escape(f"trained {result.model} ({result.parameters / 1e6:.2f}M parameters)"))
    for col in ("epochs", "best epoch", "val loss", "val acc", "img/s", "seconds"):
        table.add_column(col, justify="right")
    table.add_row(
        str(result.epochs_run),
        str(result.best_epoch),
        f"{result.best_validation_loss:.4f}",
        f"{result.validation_accuracy:.3f}",
        f"{result.images_per_second:.0f}",
        f"{result.train_seconds:.1f}",
    )
    console.print(table)
    if result.feature_cache != "off":
        console.print(
            f"finetune {result.finetune}: backbone maps {result.feature_cache} "
            f"({result.feature_seconds:.1f} s of the {result.train_seconds:.1f} s)"
        )
    console.print(f"checkpoint: {escape(str(result.checkpoint))}")


def _fit_anomaly(data: Path, out: Path, image_size: int | None, fit: str, seed: int) -> None:
    from rich.progress import Progress

    from kensa.models.data.ingest import DatasetError
    from kensa.models.nets.backbones import BackboneError
    from kensa.models.nets.patchcore import PatchCoreConfig
    from kensa.models.train.anomaly import fit_anomaly_run

    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        tasks: dict[str, Any] = {}

        def advance(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        try:
            path = fit_anomaly_run(data, out, PatchCoreConfig(seed=seed), image_size, fit, advance)
        except (ValueError, FileNotFoundError, DatasetError, BackboneError) as exc:
            bar.stop()
            raise fail(str(exc)) from None
    summary = json.loads((out / "train.json").read_text())
    console.print(
        f"fitted patchcore on {summary['good_parts']} good parts: bank {summary['bank_size']} of "
        f"{summary['patches_seen']} patches, {summary['fit_seconds']:.1f} s"
    )
    console.print(f"checkpoint: {escape(str(path))}")


def print_qc_table(metrics: dict[str, Any], title: str = "QC on the test split") -> None:
    table = Table(title=title)
    for col in ("escape rate", "false reject", "automation", "review", "accuracy", "n"):
        table.add_column(col, justify="right")
    table.add_row(
        f"{metrics['escape_rate']:.3%}",
        f"{metrics['false_reject_rate']:.3%}",
        f"{metrics['automation_rate']:.1%}",
        f"{metrics['review_rate']:.1%}",
        f"{metrics['accuracy']:.3f}",
        str(metrics["n"]),
    )
    console.print(table)
    recall = Table(title="per-class recall (argmax) / defect catch rate (not passed)")
    recall.add_column("class")
    recall.add_column("recall", justify="right")
    recall.add_column("caught", justify="right")
    for c, r in metrics["per_class_recall"].items():
        caught = metrics["defect_catch_rate"].get(c)
        recall.add_row(
            escape(c), "-" if r is None else f"{r:.3f}", "-" if caught is None else f"{caught:.3f}"
        )
    console.print(recall)


def print_band(band: dict[str, Any]) -> None:
    colour = "green" if band["guaranteed"] else "yellow"
    console.print(
        f"[bold]review band[/bold]: ok if score ≤ {band['t_ok']:.4f}, defect if ≥ "
        f"{band['t_defect']:.4f}  [{colour}]{escape(band['message'])}[/{colour}]"
    )


def print_robustness(rob: dict[str, Any]) -> None:
    table = Table(title=f"robustness on {rob['n_images']} test parts (mean over severities 1–5)")
    for col in ("corruption", "error", "escape", "false reject", "error gap", "rCE"):
        table.add_column(col, justify="left" if col == "corruption" else "right")
    clean = rob["clean"]
    table.add_row(
        "clean",
        f"{clean['error']:.3f}",
        f"{clean['escape_rate']:.3f}",
        f"{clean['false_reject_rate']:.3f}",
        "",
        "",
    )
    for name, sev in rob["per_corruption"].items():
        vals = list(sev.values())
        rce = rob["relative_ce"].get(name)
        table.add_row(
            escape(name),
            f"{sum(v['error'] for v in vals) / len(vals):.3f}",
            f"{sum(v['escape_rate'] for v in vals) / len(vals):.3f}",
            f"{sum(v['false_reject_rate'] for v in vals) / len(vals):.3f}",
            f"{rob['error_gap'][name]:+.3f}",
            "-" if rce is None else f"{rce:.2f}",
        )
    console.print(table)


def evaluate_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `kensa train`.")],
    data: Annotated[Path | None, typer.Option("--data", help="Dataset; default: the one trained on.")] = None,
    corruptions: Annotated[bool, typer.Option("--corruptions", help="Add the robustness suite.")] = False,
    reference: Annotated[
        Path | None, typer.Option("--reference", help="Run dir of the reference model for relative CE.")
    ] = None,
    alpha: Annotated[float, typer.Option("--alpha", help="Max escape rate the band guarantees.")] = 0.02,
    delta: Annotated[float, typer.Option("--delta", help="1 − confidence of the guarantee.")] = 0.1,
    max_false_reject: Annotated[float, typer.Option("--max-false-reject")] = 0.05,
) -> None:
    """Evaluate a run like a QC lead: band, escapes, false rejects, slices, robustness, plots."""
    from kensa.models.data.ingest import DatasetError
    from kensa.models.evaluation.evaluate_run import BandPolicy, evaluate_run
    from kensa.models.train.anomaly import is_anomaly_run

    if is_anomaly_run(run_dir):
        if corruptions or reference or data:
            raise fail(
                "--corruptions, --reference and --data are not supported for anomaly models yet; "
                "an anomaly run is evaluated on the dataset it was fitted on"
            )
        _evaluate_anomaly(run_dir, BandPolicy(alpha, delta, max_false_reject))
        return
    try:
        metrics = evaluate_run(
            run_dir, data, corruptions, BandPolicy(alpha, delta, max_false_reject), reference
        )
    except (ValueError, FileNotFoundError, DatasetError) as exc:
        raise fail(str(exc)) from None
    print_band(metrics["band"])
    print_qc_table(metrics)
    if "robustness" in metrics:
        print_robustness(metrics["robustness"])
    console.print(escape(f"metrics: {run_dir / 'metrics.json'}  plots: {run_dir / 'plots'}"))


def _evaluate_anomaly(run_dir: Path, policy: Any) -> None:
    from kensa.models.data.ingest import DatasetError
    from kensa.models.evaluation.evaluate_anomaly import evaluate_anomaly_run

    try:
        m = evaluate_anomaly_run(run_dir, policy)
    except (ValueError, FileNotFoundError, DatasetError) as exc:  # NotEnoughCalibrationError too
        raise fail(str(exc)) from None
    print_band(m["band"])
    table = Table(title="QC on the test split (anomaly model)")
    for col in ("escape rate", "false reject", "automation", "image AUROC", "pixel AUROC", "n"):
        table.add_column(col, justify="right")

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.3%}"

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    table.add_row(
        pct(m["escape_rate"]),
        pct(m["false_reject_rate"]),
        f"{m['automation_rate']:.1%}",
        num(m["defect_auroc"]),
        num(m.get("pixel_auroc")),
        str(m["n_test"]),
    )
    console.print(table)
    support = ", ".join(f"{k}: {v}" for k, v in m["labels_support"].items())
    console.print(escape(f"what the labels support: {support}"))
    console.print(escape(f"metrics: {run_dir / 'metrics.json'}  plots: {run_dir / 'plots'}"))


def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Evaluated run directory.")],
    out: Annotated[Path, typer.Option("--out", help="ONNX file to write.")],
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write a gated FP16 variant.")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Also write a gated INT8 variant.")] = False,
) -> None:
    """Export to ONNX with metadata and a parity check against PyTorch."""
    from kensa.models.onnx.export import ParityError, export_run
    from kensa.models.train.anomaly import is_anomaly_run

    if is_anomaly_run(run_dir):
        if fp16 or int8:
            raise fail("--fp16/--int8 are for classifiers; an anomaly model exports in FP32 only")
        _export_anomaly(run_dir, out)
        return
    try:
        result = export_run(run_dir, out, fp16=fp16, int8=int8)
    except ParityError as exc:
        # The export ran and its parity gate said no: nothing is written (exit 3, like a KPI gate).
        raise fail(f"parity check failed: {exc}", ExitCode.GATE) from None
    except (ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None
    print_parity(result.parity)
    for name, v in result.variants.items():
        state = "[green]kept[/green]" if v["kept"] else f"[yellow]dropped[/yellow] ({escape(v['reason'])})"
        console.print(f"{escape(name)}: verdict agreement {v['verdict_agreement']:.2%}, {state}")
    console.print(f"model: {escape(str(result.path))}  sha256 {result.sha256[:16]}…")


def _export_anomaly(run_dir: Path, out: Path) -> None:
    from kensa.models.onnx.anomaly import export_anomaly_run
    from kensa.models.onnx.export import ParityError

    try:
        report = export_anomaly_run(run_dir, out)
    except ParityError as exc:
        raise fail(f"parity check failed: {exc}", ExitCode.GATE) from None
    except (ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None
    p = report["parity"]
    console.print(
        f"parity [green]passed[/green]: {p['n_images']} images, max |Δscore| "
        f"{p['max_abs_score_diff']:.2e}, max |Δmap| {p['max_abs_map_diff']:.2e}, verdict agreement "
        f"{p['verdict_agreement']:.2%}"
    )
    console.print(f"model: {escape(str(out))}  sha256 {report['sha256'][:16]}…")


def print_parity(parity: dict[str, Any]) -> None:
    ok = "[green]passed[/green]" if parity["passed"] else "[red]FAILED[/red]"
    console.print(
        f"parity {ok}: {parity['n_images']} images, max |Δp| {parity['max_abs_prob_diff']:.2e} "
        f"(≤ {parity['tolerance']:.0e}), verdict agreement {parity['verdict_agreement']:.2%}"
    )
