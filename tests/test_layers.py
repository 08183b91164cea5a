"""veil's layers (docs/architecture.md) hold: each imports only from the layers below it, and no
module hides an upward import inside a function."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS_ABOVE_API = ("cli.py", "bench/", "attacks/", "train/", "eval.py", "api.py")


def test_import_linter_contracts_are_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def test_no_function_local_import_of_the_facade_below_it():
    """import-linter sees function-local imports too; this names the pattern a cycle hides in:
    a module under the facade reaching up to `veil.api` (or `import veil`) inside a function."""
    offenders = []
    for path in sorted((ROOT / "veil").rglob("*.py")):
        rel = path.relative_to(ROOT / "veil").as_posix()
        if rel.startswith(LAYERS_ABOVE_API) or rel == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "veil" or n.startswith("veil.api") for n in names):
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, offenders
