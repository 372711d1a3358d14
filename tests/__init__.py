"""Jarvis Argus test suite: one folder per area, harnesses in tests/support."""
