"""Anomaly detectors on seeded serving-metric traces (issue #19).

    python -m benchmarks.anomaly

Trains ``llmdeploy.deploy.VAEDetector`` on the seed-0 trace (2000 steps of 10 s) with 20% of its
labels (``semi_supervised_labels``), fits ENOVA's rules (``RuleDetector``) to the same trace, and
scores both on the held-out seed-1 trace: point-wise precision/recall/F1 and event recall per kind
of injected anomaly. Writes ``results/deploy/anomaly.json`` and ``ANOMALY.md``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from llmdeploy.deploy import (
    RuleDetector,
    VAEDetector,
    evaluate_detector,
    semi_supervised_labels,
    synthetic_trace,
)

RESULTS = Path(__file__).resolve().parent / "results" / "deploy"


def main() -> int:
    torch.set_num_threads(1)
    train, test = synthetic_trace(2000, seed=0), synthetic_trace(2000, seed=1)
    rows = {"VAEDetector (semi-supervised, 20% of labels)":
            evaluate_detector(VAEDetector().fit(train, semi_supervised_labels(train, 0.2, seed=0)).predict(test), test),
            "RuleDetector (ENOVA's open-code rules)": evaluate_detector(RuleDetector().fit(train).predict(test), test)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "anomaly.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows,
                                                      "segments": len(test.kinds)}, indent=1))
    lines = [f"# Anomaly detection on seeded traces (`python -m benchmarks.anomaly`, {time.strftime('%Y-%m-%d')})", "",
             f"Train: seed-0 trace, 2000 steps, 20% of labels; test: seed-1 trace, {len(test.kinds)} injected segments.",
             "", "| detector | precision | recall | F1 | event recall | flagged steps | anomalous steps |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['event_recall']:.3f} | "
                     f"{r['flagged']} | {r['anomalous']} |")
    (RESULTS / "ANOMALY.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
