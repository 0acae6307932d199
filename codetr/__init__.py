"""codetr: Co-DETR (collaborative hybrid assignments training) in pure PyTorch."""

__version__ = "0.1.0"
