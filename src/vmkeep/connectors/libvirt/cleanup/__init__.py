"""Cleaning up after killed runs (local and over remote URIs) before a new one starts."""
