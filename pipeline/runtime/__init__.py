"""What a worker process runs, and all it may import: the frame protocol, the shared-memory
layout, the worker state machine, its span rings and stack dumps. Nothing here imports torch
(``tests/test_boundaries.py`` holds it to that)."""
