"""Benchmark evaluation: the task list (`eval.benchmarks`), local lm-eval tasks (`eval/tasks/`), data preparation
(`eval.prepare`, `eval.convert`), task YAML rendering (`eval.taskgen`), the lm-eval adapter (`eval.lm`) and the
runner (`eval.harness`). See eval/README.md."""
