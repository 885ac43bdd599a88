"""Retrieval quality without labels: altered copies of banners (alterations), what is measured (metrics), reports."""
