"""lora_trainer: the program in the trainer image that runs one LoRAJob to a verified adapter."""

__version__ = "0.1.0"
