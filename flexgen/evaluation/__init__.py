"""Evaluation: metrics of generated images (registered in ``flexgen.registry.METRICS``)."""
from .classifier import SmallConvClassifier, TrainedClassifier, classify, train_classifier
from .frechet import feature_statistics, frechet_distance
from .metrics import GeneratedClassAccuracy
from .sample_writer import SampleWriter

__all__ = ['SmallConvClassifier', 'TrainedClassifier', 'classify', 'train_classifier',
           'feature_statistics', 'frechet_distance', 'GeneratedClassAccuracy', 'SampleWriter']
