"""segserve models."""
