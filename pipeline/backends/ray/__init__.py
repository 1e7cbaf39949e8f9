"""The Ray backend: each node's workers in a Ray actor with its own shared memory."""
