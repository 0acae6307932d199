"""Necks: the channel mapper (and the auxiliary heads' pyramid adapter), the simple feature pyramid."""
