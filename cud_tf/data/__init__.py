"""tfds input pipelines and the offline MNIST builder."""

from cud_tf.data.pipeline import (
    DataConfig,
    DataNotPreparedError,
    distribute,
    get_builder,
    image_shape,
    make_dataset,
    num_classes,
)

__all__ = [
    "DataConfig",
    "DataNotPreparedError",
    "distribute",
    "get_builder",
    "image_shape",
    "make_dataset",
    "num_classes",
]
