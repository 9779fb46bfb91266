"""Datasets, Algorithm 1 (semi-supervised Inf-Net), Algorithm 2 (staged fusion), metrics."""
