"""LightReasoner as a distributed Ray cluster job.

Small language models teaching large ones to reason: an expert and an amateur model
are contrasted token by token, the steps where they diverge become soft labels, and
the expert is distilled towards them.
"""

__version__ = "0.1.0"
