"""Balcony Serve's runtime: a frozen LLaMA backbone served at several depths (Balcony exits)."""
