"""What the benchmark scripts share: the seed-spread cells of an accuracy table, measurements in a fresh
process, a table row that survives its measurement failing, and writing a table out."""

from __future__ import annotations

import json
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path


def in_fresh_process(script: str, *worker_args) -> dict:
    """Run ``script --worker ARGS...`` in a new Python process (so that peak memory and timings of one
    measurement do not mix with another's) and return the JSON object its last output line prints."""
    result = subprocess.run([sys.executable, script, "--worker", *map(str, worker_args)], capture_output=True,
                            text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def spread_cells(accuracies: list[float]) -> str:
    """``mean | min – max | a / b / c``: an accuracy over seeds as the README reports it."""
    mean = sum(accuracies) / len(accuracies)
    return (f"{mean:.1%} | {min(accuracies):.1%} – {max(accuracies):.1%} | "
            f"{' / '.join(f'{a:.1%}' for a in accuracies)}")


def measured_row(label: str, measure: Callable[[], list[str]]) -> str:
    """``| label | cells |`` from ``measure()``, printed as soon as it is measured; an exception becomes the row's
    error cell (its traceback printed), so one failing measurement leaves the others' rows."""
    try:
        cells = measure()
    except Exception as error:
        traceback.print_exc()
        cells = [f"error: {type(error).__name__}: {str(error)[:120]}"]
    line = f"| {label} | " + " | ".join(cells) + " |"
    print(line, flush=True)
    return line


def emit(lines: list[str], output: str | None) -> None:
    """Print the table and, when ``output`` is given, write it there (markdown)."""
    table = "\n".join(lines)
    print(table)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(table + "\n")
