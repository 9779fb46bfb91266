"""Worklist page, JSON API, /healthz and /metrics."""
