"""Protégé learners package."""
