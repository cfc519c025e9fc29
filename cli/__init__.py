"""winq.cli."""
