"""The stages of a run (sampling, training, evaluation, rejection sampling, export, inspect, compare).

A stage never imports another stage; ``lightreasoner_ray.runs`` composes them.
"""
