"""Deployment decisions (ENOVA-style): serving configurations from measured latencies and memory
(:mod:`.recommend`), anomaly detection over serving metrics (:mod:`.anomaly`), and autoscaling
policies with a discrete-event simulator (:mod:`.autoscale`)."""

from .anomaly import (
    FEATURES,
    RuleDetector,
    Trace,
    VAEDetector,
    evaluate_detector,
    semi_supervised_labels,
    synthetic_trace,
)
from .autoscale import ENOVAPolicy, ENOVARules, SimResult, Static, arrivals, simulate
from .recommend import Profile, Recommendation, Workload, measure_profile, p95_ttft, recommend

__all__ = ["ENOVAPolicy", "ENOVARules", "FEATURES", "Profile", "SimResult", "Static", "arrivals", "simulate", "Recommendation", "RuleDetector", "Trace", "VAEDetector", "Workload",
           "evaluate_detector", "measure_profile", "p95_ttft", "recommend", "semi_supervised_labels",
           "synthetic_trace"]
