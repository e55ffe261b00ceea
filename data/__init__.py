"""Data preparation and self-distillation scripts, and the prompt files they share."""
