"""Datasets for training and evaluating the demo model."""
