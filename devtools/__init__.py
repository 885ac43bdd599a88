"""Development tools shared by tests/ and bench/ (not installed with the service)."""
