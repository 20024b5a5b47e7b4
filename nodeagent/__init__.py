"""The per-host node agent: traffic capture, the host proxy, admin endpoint and telemetry."""
