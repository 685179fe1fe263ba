"""Deployment decisions (ENOVA-style): serving configurations from measured latencies and memory
(:mod:`.recommend`), and anomaly detection over serving metrics (:mod:`.anomaly`)."""

from .anomaly import (
    FEATURES,
    RuleDetector,
    Trace,
    VAEDetector,
    evaluate_detector,
    semi_supervised_labels,
    synthetic_trace,
)
from .recommend import Profile, Recommendation, Workload, measure_profile, p95_ttft, recommend

__all__ = ["FEATURES", "Profile", "Recommendation", "RuleDetector", "Trace", "VAEDetector", "Workload",
           "evaluate_detector", "measure_profile", "p95_ttft", "recommend", "semi_supervised_labels",
           "synthetic_trace"]
