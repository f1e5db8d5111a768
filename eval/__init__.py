"""Evaluation: batch generation, exact mergeable metrics and the `ift score` entry point."""
