"""Public functional ops: validation, torch.library registration, autograd, backend tables."""
