"""Balcony Serve's front: the `balcony` command line and the OpenAI-compatible HTTP server."""
