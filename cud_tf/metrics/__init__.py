"""Quality metrics: the Fréchet distance, FID from TTUR's Inception graph, a distance on Keras' InceptionV3 (not
FID), and the project's MNIST classifier ("FD (MNIST classifier)")."""
from cud_tf.metrics.fid_inception import InceptionGraph
from cud_tf.metrics.frechet import FeatureStats, Gaussian, frechet_distance, load_statistics, min_samples
from cud_tf.metrics.inception import InceptionFeatures
from cud_tf.metrics.mnist_classifier import ClassifierConfig, ClassifierError, MnistClassifier

__all__ = ["ClassifierConfig", "ClassifierError", "FeatureStats", "Gaussian", "InceptionFeatures", "InceptionGraph",
           "MnistClassifier", "frechet_distance", "load_statistics", "min_samples"]
