"""Benchmarks of llmdeploy: speed and quality goals live here, not in timed tests."""
