"""Active learning on the Loop API: pools, MC-dropout prediction, heuristics and the cycle loop.

``ActiveLearningDataModule`` keeps the labelled/unlabelled pools, ``ActiveLearningLoop`` wraps
the trainer's fit loop (train, score the pool with ``MCDropoutPredictionLoop``, label, retrain),
``heuristics`` scores Monte-Carlo probabilities (higher: more informative).
"""
from fastloop.active_learning import heuristics
from fastloop.active_learning.data import ActiveLearningDataModule
from fastloop.active_learning.loop import ActiveLearningLoop
from fastloop.active_learning.mc_dropout import MCDropoutPredictionLoop, dropout_layers

__all__ = ["ActiveLearningDataModule", "ActiveLearningLoop", "MCDropoutPredictionLoop", "dropout_layers",
           "heuristics"]
