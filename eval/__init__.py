"""Benchmark evaluation: local lm-eval tasks (`eval/tasks/`), data preparation (`eval.prepare`), task YAML
rendering (`eval.taskgen`) and the lm-eval adapter + runner (`eval.harness`). See eval/README.md."""
