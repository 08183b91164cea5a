"""Model variants as config knobs plus conversions (MERGE; later Power-Softmax)."""
