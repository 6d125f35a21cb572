"""`ctloop drift`: a drift check between two record files, outside any cycle."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctloop.config import CtloopConfig, DriftConfig, ModelConfig, load_config
from ctloop.errors import DataError


def _embedded(reference_path: Path, current_path: Path, config_path: Path | None):
    from ctloop.data.records import read_records
    from ctloop.drift.embed import embed_records, make_embedder

    config: CtloopConfig | None = load_config(config_path) if config_path else None
    drift_config = config.drift if config else DriftConfig()
    if drift_config.embedder == "base_model" and config is None:
        raise DataError("drift.embedder=base_model needs --config with a model section")
    model = config.model if config else ModelConfig(base="unused")
    reference, ref_skipped = read_records(reference_path)
    current, cur_skipped = read_records(current_path)
    for path, records in ((reference_path, reference), (current_path, current)):
        if not records:
            raise DataError(
                f"{path}: no valid records to compare; check the file (each row needs "
                f"prompt and completion, or messages)"
            )
    embedder = make_embedder(drift_config, model)
    return (
        drift_config,
        current,
        embed_records(reference, embedder, drift_config.text, None),
        embed_records(current, embedder, drift_config.text, None),
        {"reference": ref_skipped, "current": cur_skipped},
    )


def check_stream(reference_path: Path, current_path: Path, config_path: Path | None, ert: int, window: int) -> dict:
    """Feed the current rows, in file order, to the online detector calibrated on the reference.

    With no drift the detector raises a false alarm about every `ert` rows or less often (it resets
    after each; calibrated so that even a reference whose mean misses the truth by a worse than
    usual error reaches `ert`), so over N rows at most about N/ert alarms are expected: "any alarm" would be drift almost surely
    on a long file. The decision is calibrated for the window instead: drift when the alarm count is
    improbable under Poisson(N/ert) at `drift.alpha` (the run lengths make the count close to
    Poisson; a little under-dispersed, so the test errs on the side of no drift)."""
    from ctloop.drift.online import OnlineDriftDetector, window_decision

    drift_config, current, ref_emb, cur_emb, skipped = _embedded(reference_path, current_path, config_path)
    detector = OnlineDriftDetector(ref_emb.astype(np.float64), ert=ert, window=window)
    updates = detector.update(cur_emb.astype(np.float64))
    alarms = [i for i, u in enumerate(updates) if u.drift]
    drift, expected, p_value = window_decision(len(alarms), len(updates), ert, drift_config.alpha)
    summary = (
        f"online drift check: {'drift' if drift else 'no drift'} over {len(updates)} rows: {len(alarms)} alarms, "
        f"{expected:.2f} expected without drift (expected rows between false alarms {ert}, window {window}; "
        f"p={p_value:.3g}, alpha {drift_config.alpha})"
    )
    return {
        "drift": drift,
        "outcome": "drift" if drift else "no_drift",
        "mode": "online",
        "n_reference": len(ref_emb),
        "n_current": len(cur_emb),
        "skipped_rows": skipped,
        "alarm_rows": alarms,
        "expected_false_alarms": expected,
        "p_value": p_value,
        "threshold": detector.threshold,
        "detectors": [
            {
                "name": "online_rff_mmd",
                "statistic": max((u.statistic for u in updates if u.statistic == u.statistic), default=0.0),
                "p_value": p_value,
                "drift": drift,
            }
        ],
        "reasons": [
            f"{len(alarms)} alarms in {len(updates)} rows, {expected:.2f} expected without drift; first at row "
            f"{alarms[0]}: {current[alarms[0]].id}"
            if alarms
            else "no alarm: the stream stayed like the reference"
        ],
        "summary": summary,
    }


def check_files(reference_path: Path, current_path: Path, config_path: Path | None, report_path: Path | None) -> dict:
    """Embed both files, run the configured detectors, optionally write the HTML report.

    Returns the JSON-ready result: drift, sizes, skipped rows, detectors with p-values, reasons."""
    from ctloop.drift.detectors import detect_drift
    from ctloop.drift.embed import texts_of
    from ctloop.reports.drift import write_drift_report

    drift_config, current, ref_emb, cur_emb, skipped = _embedded(reference_path, current_path, config_path)
    report = detect_drift(ref_emb, cur_emb, drift_config)
    if report_path:
        write_drift_report(report_path, report, ref_emb, cur_emb, texts_of(current, drift_config.text))
    return {
        "drift": report.drift,
        "outcome": report.outcome,
        "n_reference": report.n_reference,
        "n_current": report.n_current,
        "skipped_rows": skipped,
        "alpha": report.alpha,
        "detectors": [
            {
                "name": d.name,
                "statistic": d.statistic,
                "p_value": d.p_value,
                "adjusted_p_value": d.adjusted_p,
                "drift": d.drift,
            }
            for d in report.detectors
        ],
        "reasons": list(report.reasons),
        "explanation": report.explanation,
        "summary": report.summary(),
    }
