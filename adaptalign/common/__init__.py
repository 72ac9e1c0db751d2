"""Helpers every floor may use: atomic files, errors, hub probing, progress lines."""
