"""The teacher-signal cache reader, now in `align_distill.teachers.signals` (the teacher sources' layer); kept here
so that `from align_distill.trainers.signals import ...` goes on working."""

from align_distill.teachers.signals import (
    BatchSignals,
    SignalsMismatchError,
    TeacherSignalReader,
    live_signals,
    scatter_rows,
)

__all__ = ["BatchSignals", "SignalsMismatchError", "TeacherSignalReader", "live_signals", "scatter_rows"]
