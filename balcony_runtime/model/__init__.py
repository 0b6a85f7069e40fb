"""The frozen backbone with balcony exits, and our own forward over its weights."""
