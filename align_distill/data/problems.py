"""Data problems and the error that carries all of them, so a user fixes a file in one pass, not one row per run."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from align_distill.errors import UserError


@dataclass(frozen=True)
class DataProblem:
    """One thing wrong with a dataset.

    `row` is the 1-based data row: the n-th record of a JSON/JSONL file (blank JSONL lines are not rows), the n-th
    line after the header of a CSV file, the n-th row of a parquet file, saved folder or hub split. `row` and
    `column` are None when the problem concerns the whole file or a whole column.
    """

    file: str
    row: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.row is not None:
            where += f":row {self.row}"
        if self.column is not None:
            where += f":column {self.column}"
        return f"{where}: {self.message}"


class DataValidationError(UserError, ValueError):
    """A dataset could not be read or failed validation; `.problems` holds every problem found."""

    def __init__(self, problems: Iterable[DataProblem]):
        self.problems: list[DataProblem] = list(problems)
        if not self.problems:
            raise ValueError("DataValidationError needs at least one problem")
        files = sorted({problem.file for problem in self.problems})
        count = len(self.problems)
        header = f"{count} data problem{'s' if count != 1 else ''} in {', '.join(files)}:"
        super().__init__("\n".join([header, *(f"  {problem}" for problem in self.problems)]))
