"""Alembic migrations; run them with `fieldgate db upgrade` (or `run`, by default)."""
