"""MONAI transforms (HU -> lung window -> slices -> tensors) and study scoring."""
