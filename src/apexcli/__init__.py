"""apex: multi-objective online RL (APEX on Flow-GRPO) for text-to-image flow models."""

__version__ = "0.1.0"
