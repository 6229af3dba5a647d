"""Continual learning: metrics over the accuracy matrix and W-NCFT inference-time mixing."""
