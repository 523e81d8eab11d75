"""Training: the loop shared by every peft method."""
