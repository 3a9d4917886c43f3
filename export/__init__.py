"""segserve export."""
