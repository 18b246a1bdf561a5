"""Shipped example configs and the example image-folder builder."""
