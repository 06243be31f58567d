"""Protégé serve package."""
