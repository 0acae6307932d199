"""Losses of the DETR heads: the one-to-one (Hungarian) criterion and the quality focal loss."""
