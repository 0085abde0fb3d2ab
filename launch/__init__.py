"""Thin entry points: parse config, call a function in the packages."""
