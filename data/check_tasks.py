"""Check the bundled task-tuning tasks (or task files you name) on a model (default: the embedded one).

    .venv/bin/python data/check_tasks.py [TASK.json ...]

A task passes when its file loads as a :class:`kvlens.tuning.Task` (non-empty splits, every
example's label in the label set, every label seen in training, every label named in the prompt
template, labels distinct, splits not unbalanced) and, on the model, every label is one
consistently tokenized answer: its tokens after the prompt are its tokens on its own (no merge
across the prompt's end), and no label's tokens are a prefix of another's. Exit status 1 if any
task fails. Importable: tests call :func:`check_task_file` on the embedded model.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TASKS = Path(__file__).parent / "tasks"


@dataclass(frozen=True)
class TaskCheck:
    """The check of one task file: its name, sizes, label token counts and any problem found."""

    path: str
    name: str
    n_train: int
    n_test: int
    label_tokens: dict[str, int]
    problem: str = ""

    @property
    def passed(self) -> bool:
        return not self.problem


def check_task_file(model: Any, path: str | Path) -> TaskCheck:
    """Load ``path`` as a task (warnings count as failures) and check its labels' tokens on ``model``."""
    from kvlens.tuning import check_tokenization, load_task

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            task = load_task(path)
        toks = check_tokenization(model, task)
    except (ValueError, TypeError, UserWarning) as exc:
        return TaskCheck(str(path), Path(path).stem, 0, 0, {}, f"{type(exc).__name__}: {exc}")
    return TaskCheck(str(path), task.name, len(task.train), len(task.test), {t.label: len(t.alone) for t in toks})


def bundled_files() -> list[Path]:
    return sorted(TASKS.glob("*.json"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", default=[str(p) for p in bundled_files()])
    args = parser.parse_args(argv)
    import kvlens

    model = kvlens.load()
    checks = [check_task_file(model, f) for f in args.files]
    for c in checks:
        status = "ok  " if c.passed else "FAIL"
        print(f"{status} {c.name}: {c.n_train} train, {c.n_test} test, label tokens {c.label_tokens} {c.problem}")
    return 0 if all(c.passed for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
