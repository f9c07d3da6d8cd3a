"""A tiny tensorflow-datasets dataset built from local data (no TensorFlow, no download):
scikit-learn's digits as uint8 image tensors with a caption and a class label."""

import numpy as np
import tensorflow_datasets as tfds

from jaxlm.images import DIGIT_WORDS, TRAIN_TEMPLATES, caption


class JaxlmTinyDigits(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "caption": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=list(DIGIT_WORDS)),
                }
            )
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 300), "test": self._generate_examples(300, 360)}

    def _generate_examples(self, start: int, stop: int):
        from sklearn.datasets import load_digits

        d = load_digits()
        for i in range(start, stop):
            label = int(d.target[i])
            image = np.round(d.images[i] * (255 / 16)).astype(np.uint8)[..., None]
            yield (
                i,
                {
                    "image": image,
                    "caption": caption(TRAIN_TEMPLATES[i % len(TRAIN_TEMPLATES)], label),
                    "label": label,
                },
            )
