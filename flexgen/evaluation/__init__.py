"""Evaluation: metrics of generated images (registered in ``flexgen.registry.METRICS``),
Inception features and reference statistics, sharded resumable generation."""
from .classifier import SmallConvClassifier, TrainedClassifier, classify, train_classifier
from .fid import InceptionMetrics, inception_score, precision_recall
from .frechet import feature_statistics, frechet_distance
from .inception import InceptionFeatures
from .metrics import GeneratedClassAccuracy
from .reference import InceptionStatistics, ReferenceReader, statistics_from_features
from .sample_writer import SampleWriter
from .utils import size_key, to_uint8, user_cache_dir

__all__ = ['SmallConvClassifier', 'TrainedClassifier', 'classify', 'train_classifier',
           'InceptionMetrics', 'inception_score', 'precision_recall', 'feature_statistics',
           'frechet_distance', 'InceptionFeatures', 'GeneratedClassAccuracy',
           'InceptionStatistics', 'ReferenceReader', 'statistics_from_features',
           'SampleWriter', 'size_key', 'to_uint8', 'user_cache_dir']
