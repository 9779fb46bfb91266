"""Torch modules: backbones with local weight loading, CBAM CNN, fusion, heat-map, Inf-Net."""
