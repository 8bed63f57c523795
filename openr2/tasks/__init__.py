"""Reasoning tasks shared by training, RL and evaluation: synthetic problems, wordings, answers.

`synthetic.py` (generators, verifiers, the held-out split, a problem as a chat), `wordings.py` (how people
ask), `answers.py` (the answer after `</think>`, the majority vote) and `jsonl.py` (task and benchmark
files). Imported by train/ and eval/; imports neither (nor the engine, model or server).
"""
