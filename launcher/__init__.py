"""ift launcher: CLI, config, the pipeline driver and MLflow run handling."""

__version__ = "0.1.0"
