"""winq.exporters."""
