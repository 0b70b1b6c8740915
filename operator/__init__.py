"""lora_operator: the Kubernetes side of lora-operator (API model, planning, building, reconciling)."""

__version__ = "0.1.0"
