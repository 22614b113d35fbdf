"""Benchmarks of every xray_ops op against PyTorch baselines and peers: ``python -m bench``."""
