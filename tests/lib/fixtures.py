"""pytest fixtures re-exported by tests/conftest.py."""
