"""Thin command-line entry points: argument parsing only, over the importable functions."""
