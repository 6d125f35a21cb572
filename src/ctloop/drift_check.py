"""`ctloop drift`: a drift check between two record files, outside any cycle."""

from __future__ import annotations

from pathlib import Path

from ctloop.config import CtloopConfig, DriftConfig, ModelConfig, load_config
from ctloop.errors import DataError


def check_files(reference_path: Path, current_path: Path, config_path: Path | None,
                report_path: Path | None) -> dict:
    """Embed both files, run the configured detectors, optionally write the HTML report.

    Returns the JSON-ready result: drift, sizes, skipped rows, detectors with p-values, reasons."""
    from ctloop.drift import detect_drift
    from ctloop.embed import embed_records, make_embedder, texts_of
    from ctloop.records import read_records
    from ctloop.reports import write_drift_report

    config: CtloopConfig | None = load_config(config_path) if config_path else None
    drift_config = config.drift if config else DriftConfig()
    if drift_config.embedder == "base_model" and config is None:
        raise DataError("drift.embedder=base_model needs --config with a model section")
    model = config.model if config else ModelConfig(base="unused")
    reference, ref_skipped = read_records(reference_path)
    current, cur_skipped = read_records(current_path)
    for path, records in ((reference_path, reference), (current_path, current)):
        if not records:
            raise DataError(f"{path}: no valid records to compare; check the file (each row needs "
                            f"prompt and completion, or messages)")
    embedder = make_embedder(drift_config, model)
    ref_emb = embed_records(reference, embedder, drift_config.text, None)
    cur_emb = embed_records(current, embedder, drift_config.text, None)
    report = detect_drift(ref_emb, cur_emb, drift_config)
    if report_path:
        write_drift_report(report_path, report, ref_emb, cur_emb, texts_of(current, drift_config.text))
    return {
        "drift": report.drift, "outcome": report.outcome, "n_reference": report.n_reference,
        "n_current": report.n_current, "skipped_rows": {"reference": ref_skipped, "current": cur_skipped},
        "alpha": report.alpha,
        "detectors": [{"name": d.name, "statistic": d.statistic, "p_value": d.p_value,
                       "adjusted_p_value": d.adjusted_p, "drift": d.drift} for d in report.detectors],
        "reasons": list(report.reasons), "explanation": report.explanation, "summary": report.summary(),
    }
