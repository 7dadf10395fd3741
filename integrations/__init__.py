"""Runnable examples: a stock Hugging Face script plus the few lines marked ``# LDFA``."""
