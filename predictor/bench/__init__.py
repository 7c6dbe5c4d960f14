"""The few-shot latency prediction bench (`latfarm bench predictor`): the twelve cross-device tasks
of the MLSys 2024 latency-predictor study, our predictor against simple baselines."""

from predictor.bench.data import Task, load_space_table, load_tasks, split
from predictor.bench.methods import METHODS, Method, Prediction, TaskContext, get_methods
from predictor.bench.run import QUICK_CONFIG, RAW_COLUMNS, BenchMismatch, BenchResult, run_bench

__all__ = [
    "METHODS", "QUICK_CONFIG", "RAW_COLUMNS", "BenchMismatch", "BenchResult", "Method", "Prediction", "Task",
    "TaskContext", "get_methods", "load_space_table", "load_tasks", "run_bench", "split",
]
