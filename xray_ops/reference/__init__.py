"""Pure-PyTorch definitions of every op: the oracle for tests and the ``torch`` backend."""
