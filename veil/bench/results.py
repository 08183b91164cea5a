"""Writing a suite's results: `benchmarks/results/<stem>.{json,md,png}`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable


def save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_results(out_dir: str | Path, stem: str, res: dict[str, Any], markdown: str,
                  plot: Callable[[dict[str, Any], Path], None]) -> list[Path]:
    """The JSON (the whole result), the markdown table and the plot, in that order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"]
    paths[0].write_text(json.dumps(res, indent=1, default=str) + "\n")
    paths[1].write_text(markdown)
    plot(res, paths[2])
    return paths
