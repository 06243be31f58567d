"""Protégé cluster package."""
