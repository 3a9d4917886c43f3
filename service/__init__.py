"""segserve service."""
