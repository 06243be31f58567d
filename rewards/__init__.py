"""Protégé rewards package."""
