"""How the loop orders decisions: fixed stages, first-ready dynamic batches, lookahead."""
