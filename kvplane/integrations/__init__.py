"""Hosts kvplane runs inside (serving frameworks)."""
