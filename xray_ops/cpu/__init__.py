"""numba kernels of the ``cpu`` backend (imported lazily, on first use)."""
