"""Widgets of the ft-desk app, one per module."""
