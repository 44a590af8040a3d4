"""Parity: comparisons, selection recording, the stages every artifact is checked in."""
