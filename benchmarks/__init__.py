"""Benchmarks behind ``bench.py``. They print figures; tests never time anything."""
