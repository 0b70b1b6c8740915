"""Reconciling: kopf handlers and the status they derive from child objects."""
