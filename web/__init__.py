"""The dashboard: static files the hub serves (no build step)."""
