"""FP16 and INT8 variants of an exported model, each kept only if it judges like the FP32 one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from kensa.models.evaluation.qc import qc_metrics, verdicts


def _gate(
    path: Path,
    probs: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    band: dict[str, Any],
    base_probs: np.ndarray,
    base_metrics: dict[str, Any],
    tolerance: float,
) -> dict[str, Any]:
    """Keep the variant only if verdicts agree and the escape rate does not rise beyond tolerance."""
    v_base, _ = verdicts(base_probs, classes, band["t_ok"], band["t_defect"])
    v_var, _ = verdicts(probs, classes, band["t_ok"], band["t_defect"])
    agreement = float((v_base == v_var).mean()) if len(v_base) else 1.0
    metrics = qc_metrics(probs, labels, classes, band["t_ok"], band["t_defect"])
    escape_delta = metrics["escape_rate"] - base_metrics["escape_rate"]
    kept = agreement >= 1.0 - tolerance and escape_delta <= tolerance
    report = {
        "path": str(path),
        "verdict_agreement": agreement,
        "escape_rate": metrics["escape_rate"],
        "escape_rate_delta": escape_delta,
        "max_abs_prob_diff": float(np.abs(probs - base_probs).max()) if len(probs) else 0.0,
        "tolerance": tolerance,
        "kept": bool(kept),
    }
    if not kept:
        path.unlink(missing_ok=True)
        report["reason"] = (
            f"verdict agreement {agreement:.2%} or escape rate change {escape_delta:+.3f} "
            f"outside tolerance {tolerance}"
        )
    return report


def make_fp16(
    fp32: Path,
    test_nhwc: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    band: dict[str, Any],
    base_probs: np.ndarray,
    base_metrics: dict[str, Any],
    tolerance: float,
) -> dict[str, Any]:
    """FP16 weights and activations (for GPU), uint8 input and FP32 outputs kept."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from kensa.models.onnx.export import cpu_session, run_onnx

    out = fp32.with_name(fp32.stem + ".fp16.onnx")
    proto = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    onnx.save(proto, str(out))
    probs = run_onnx(cpu_session(out), test_nhwc)
    return _gate(out, probs, labels, classes, band, base_probs, base_metrics, tolerance)


def make_int8(
    fp32: Path,
    calib_nhwc: np.ndarray,
    test_nhwc: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    band: dict[str, Any],
    base_probs: np.ndarray,
    base_metrics: dict[str, Any],
    tolerance: float,
) -> dict[str, Any]:
    """Static INT8 (QDQ) quantisation calibrated on the calibration split (for CPU serving)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from kensa.models.onnx.export import cpu_session, run_onnx

    class Reader(CalibrationDataReader):
        def __init__(self, images: np.ndarray) -> None:
            self.batches = iter([images[i : i + 16] for i in range(0, len(images), 16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    out = fp32.with_name(fp32.stem + ".int8.onnx")
    quantize_static(
        str(fp32),
        str(out),
        Reader(calib_nhwc[:256]),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["Conv", "MatMul", "Gemm"],
    )
    # quantize_static drops metadata_props; serving needs them, so copy them over.
    src = onnx.load(str(fp32))
    dst = onnx.load(str(out))
    del dst.metadata_props[:]
    dst.metadata_props.extend(src.metadata_props)
    onnx.save(dst, str(out))
    probs = run_onnx(cpu_session(out), test_nhwc)
    return _gate(out, probs, labels, classes, band, base_probs, base_metrics, tolerance)
