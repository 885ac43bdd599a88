"""Offline pipeline: banner download and index building (used by scripts/, never by the app)."""
