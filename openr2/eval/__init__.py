"""Evaluation harness: benchmark tasks, answer grading (math-verify), pass@k / maj@k, and runs against the
local engine or any OpenAI-compatible endpoint. `openr2 eval` is `runner.run_eval`; see runner.py."""
