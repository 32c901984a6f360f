"""Test and benchmark infrastructure (not part of the installed package)."""
