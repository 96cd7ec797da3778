"""Adapting a pretrained model to a labelled task: linear probe, full fine-tuning, LoRA, weight-space ensembles."""
