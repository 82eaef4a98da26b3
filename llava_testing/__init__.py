"""Helpers for tests, fixtures, benchmarks and the demo's training scripts: not part of the
installed runtime package (`mlx_llava`). Import them from a checkout of the repository."""
