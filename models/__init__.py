"""Embedded default models that the project trained itself, with their recipes."""
