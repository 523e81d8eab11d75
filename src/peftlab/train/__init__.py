"""Training: the loop shared by every peft method, and its checkpoints."""
