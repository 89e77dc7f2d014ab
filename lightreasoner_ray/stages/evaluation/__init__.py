"""The evaluation stage: the Ray pool of evaluator actors, the prediction store and the stage."""
