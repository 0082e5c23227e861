"""Evaluation: metrics of generated images (registered in ``flexgen.registry.METRICS``)."""
from .classifier import SmallConvClassifier, TrainedClassifier, classify, train_classifier
from .frechet import feature_statistics, frechet_distance
from .metrics import GeneratedClassAccuracy

__all__ = ['SmallConvClassifier', 'TrainedClassifier', 'classify', 'train_classifier',
           'feature_statistics', 'frechet_distance', 'GeneratedClassAccuracy']
