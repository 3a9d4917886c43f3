"""segserve service."""

__version__ = "0.1.0"  # the one place; pyproject.toml and the exporter read it
