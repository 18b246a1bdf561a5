"""Datasets split into train / valid / test; only the discriminator ever sees them."""

from __future__ import annotations

from .base import Splits, load_data

__all__ = ["Splits", "load_data"]
