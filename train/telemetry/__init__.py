"""What a run observes, in one wing: ``collect.Telemetry`` (cadence, timing, the metrics row,
the run summary, the step's decision) and the pure metrics and collectors beside it:
``grads`` (per-layer gradient statistics against the recipe's format), ``divergence``
(loss divergence against a reference), ``perf`` (FLOPs, throughput, MFU), ``loggers``
(metrics.jsonl, W&B, console) and ``envinfo`` (package versions, hardware, git SHA)."""
