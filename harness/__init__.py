"""Catastrophic-forgetting evaluation harness: full fine-tuning vs (Q)LoRA, measured with lm-eval."""

__version__ = "0.1.0"
