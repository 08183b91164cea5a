"""What the HE executor runs (kept apart from the executor so the registry can read it without
loading SEAL)."""

SUPPORT = {
    "norm": frozenset({"affine", "poly", "rms"}),
    "activation": frozenset({"quad", "poly"}),
    "mlp": frozenset({"gated", "plain"}),
    "position": frozenset({"rope"}),
    "attention": frozenset({"power"}),
    "generation": frozenset({"standard"}),
}
