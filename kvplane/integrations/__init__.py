"""Integrations of kvplane with serving engines."""
