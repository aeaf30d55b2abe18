"""Where a teacher's signals come from at train time: a model in process, the signals cache, or a served model —
one teacher or a weighted / routed mixture of several (docs/teachers.md).

Layer: below `trainers`, above `data_gen` (it uses data_gen's cache reader and HTTP client)."""

from .mixture import mix_topk, pad_topk
from .server import ServerTeacher, TeacherServerError
from .signals import BatchSignals, SignalsMismatchError, TeacherSignalReader, live_signals, scatter_rows
from .sources import (
    CacheTeacher,
    MixtureTeacher,
    ModelTeacher,
    RoutedTeacher,
    SignalsRequest,
    TeacherSource,
    TeacherSpec,
)

__all__ = [
    "BatchSignals",
    "CacheTeacher",
    "MixtureTeacher",
    "ModelTeacher",
    "RoutedTeacher",
    "ServerTeacher",
    "SignalsMismatchError",
    "SignalsRequest",
    "TeacherServerError",
    "TeacherSignalReader",
    "TeacherSource",
    "TeacherSpec",
    "live_signals",
    "mix_topk",
    "pad_topk",
    "scatter_rows",
]
