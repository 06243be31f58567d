"""Protégé actors package."""
