"""The scheme registry: every scheme veil runs, in one list. Adding a scheme is one new module
under veil/schemes/ that defines a `Scheme`, and one entry below (docs/architecture.md)."""

from __future__ import annotations

from veil.errors import UnsupportedError
from veil.schemes.base import Scheme
from veil.schemes.baselines import BASELINES
from veil.schemes.he import HE
from veil.schemes.kvshield import KVSHIELD
from veil.schemes.loro import LORO
from veil.schemes.mpc import MERGE, MPC
from veil.schemes.plain import PLAIN
from veil.schemes.shielded import SHIELDED

SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    PLAIN, SHIELDED, LORO, *BASELINES, KVSHIELD, MPC, MERGE, HE,
)}


def get(name: str) -> Scheme:
    """The scheme called `name`, or `UnsupportedError` listing the known ones."""
    if name not in SCHEMES:
        raise UnsupportedError(f"unknown scheme {name!r} (available: {', '.join(SCHEMES)})")
    return SCHEMES[name]


def of_kind(kind: str) -> list[Scheme]:
    """The schemes of one kind (host | tee | mpc | he), in registry order."""
    return [s for s in SCHEMES.values() if s.kind == kind]


def markdown_table() -> str:
    """The README's scheme table (between its `schemes:start`/`schemes:end` markers), rendered
    from the registry; tests/test_conformance.py checks the README is up to date."""
    lines = ["| scheme | system | protects | trusted | what the untrusted side sees | status |",
             "|---|---|---|---|---|---|"]
    lines += [f"| `{s.name}` | {s.system} | {s.protects} | {s.trusted} | {s.sees} | {s.status} |"
              for s in SCHEMES.values()]
    return "\n".join(lines) + "\n"
