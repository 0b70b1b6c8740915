"""Builders: pure functions from a LoRAJob and its placement to the Kubernetes objects it needs."""
