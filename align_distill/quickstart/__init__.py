"""`align-distill quickstart`: the whole story on a CPU in minutes, as a pipeline of cached stages.

- `stages`: the stages (teacher SFT → DPO / reverse DPO, student SFT, each method's student) and their settings;
- `run`: the `call` stages that build the tiny models, write the synthetic data, the test prompts and the report,
  the `evaluate` stage that scores every model, and `run_quickstart` itself;
- `curves`: reward-vs-steps curves; `report`: the results table and charts; `vision`: the tiny vision example.
"""

from .run import (
    build_models,
    build_pipeline,
    evaluate_stage,
    run_quickstart,
    write_data,
    write_run_report,
    write_test_prompts,
)
from .stages import COMMON, DPO_SETTINGS, SFT_SCHEDULE, base_stages, student_dpo

__all__ = [
    "COMMON",
    "DPO_SETTINGS",
    "SFT_SCHEDULE",
    "base_stages",
    "build_models",
    "build_pipeline",
    "evaluate_stage",
    "run_quickstart",
    "student_dpo",
    "write_data",
    "write_run_report",
    "write_test_prompts",
]
