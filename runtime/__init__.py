"""winq.runtime."""
