"""Single-device attention compute with log-sum-exp, used by parallel/."""
