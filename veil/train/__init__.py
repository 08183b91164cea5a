"""Training recipes for the model variants (MERGE; later Power-Softmax, VeLoRA)."""
