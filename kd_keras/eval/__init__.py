"""Evaluation of a trained network on frozen features."""
