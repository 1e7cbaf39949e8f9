import os
import warnings

# One BLAS/OpenMP thread per process: the suite must pass on a loaded 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore", message="Failed to find system libvulkan")
