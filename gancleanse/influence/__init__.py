"""Influence estimators: ITD (through the recorded trajectory)."""
