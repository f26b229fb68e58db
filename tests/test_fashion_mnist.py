import numpy as np
import pytest

from simmim_hf import configuration_simmim
from simmim_hf.data import fashion_mnist


def test_recorded_statistics_match_the_training_images(fashion_mnist_dir):
    images, labels = fashion_mnist.load_fashion_mnist("train", fashion_mnist_dir)
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert sorted(np.unique(labels).tolist()) == list(range(10))
    pixels = images / 255.0
    assert pixels.mean() == pytest.approx(fashion_mnist.MEAN, abs=1e-4)
    assert pixels.std() == pytest.approx(fashion_mnist.STD, abs=1e-4)
    # The config module is Hub remote code and cannot import this one: its copy must agree.
    assert (configuration_simmim.FASHION_MNIST_MEAN, configuration_simmim.FASHION_MNIST_STD) == (
        fashion_mnist.MEAN,
        fashion_mnist.STD,
    )
