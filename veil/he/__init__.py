"""CKKS homomorphic-encryption runtime (TenSEAL's SEAL bindings): parameters, keys and the
engine (ckks.py), the slot layout and diagonal products (layout.py), polynomial evaluators
(poly.py), the HE executor of the one forward (executor.py), and the client ↔ server protocol
(protocol.py). See docs/he.md."""
