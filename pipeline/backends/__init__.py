"""Where the env workers run: processes on this machine, or Ray actors across a cluster."""
