"""Helpers every test module shares (issue 14: one of each, not one per channel)."""
