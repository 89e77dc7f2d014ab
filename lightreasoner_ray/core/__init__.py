"""Pure maths and rules: contrast, LM head, loss, update plan, LR schedule, scoring, grading.

Imports torch, numpy, sympy and the standard library only (never Ray, pyarrow or transformers),
so it runs wherever a GPU check does.
"""
