"""Adapting a pretrained model to a labelled task: linear probe (more to come: fine-tuning, LoRA)."""
