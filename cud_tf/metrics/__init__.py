"""Quality metrics: Fréchet distance, InceptionV3 features (FID proper), the MNIST classifier ("FD")."""
from cud_tf.metrics.frechet import FeatureStats, Gaussian, frechet_distance
from cud_tf.metrics.inception import InceptionFeatures
from cud_tf.metrics.mnist_classifier import ClassifierConfig, ClassifierError, MnistClassifier

__all__ = ["ClassifierConfig", "ClassifierError", "FeatureStats", "Gaussian", "InceptionFeatures",
           "MnistClassifier", "frechet_distance"]
