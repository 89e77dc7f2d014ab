"""Pure maths and rules: contrast, LM head, loss, update plan, LR schedule, scoring, grading.

Imports torch and the standard library only (never Ray), so it runs wherever a GPU check does.
"""
