"""Datasets that build without a network, and a deterministic input pipeline.

Offline TFDS datasets (`DATASETS`): `digits_mnist` (5,000 real MNIST digits, 32x32x1),
`digits_sklearn` (1,797 8x8x1 digits), `shapes` (16 shape x colour classes, 32x32x3; config
`shapes/small` for tests). Any other name goes through the TFDS catalogue.

Prompt sets for text-to-image models (`prompts`): the deterministic `compositional` set
(counts, colours, shapes, positions, with int metadata), text files, and the `Prompts` TFDS
builder (`prepare_prompts(data_dir)`, `load_prompts(builder, split)`).

    split = load_split("digits_mnist", "train", data_dir)        # uint8 images, int32 labels
    for batch in BatchIterator(split, global_batch_size=128, seed=0, start_step=step):
        ...                                                       # float32 [-1, 1] NHWC
"""

from normguard_jax.data.loading import DATASETS
from normguard_jax.data.loading import DatasetUnavailableError
from normguard_jax.data.loading import ImageSplit
from normguard_jax.data.loading import load_split
from normguard_jax.data.loading import prepare
from normguard_jax.data.pipeline import BatchIterator
from normguard_jax.data.pipeline import global_batch_indices
from normguard_jax.data.pipeline import local_batch
from normguard_jax.data.pipeline import to_model_range
from normguard_jax.data.pipeline import to_uint8
from normguard_jax.data.prompts import Prompt
from normguard_jax.data.prompts import PromptSet
from normguard_jax.data.prompts import compositional_prompts, shapes_captions
from normguard_jax.data.prompts import load_prompt_set
from normguard_jax.data.prompts import load_prompts
from normguard_jax.data.prompts import prepare_prompts
from normguard_jax.data.prompts import read_prompt_file

__all__ = [
    "DATASETS",
    "BatchIterator",
    "DatasetUnavailableError",
    "ImageSplit",
    "Prompt",
    "PromptSet",
    "compositional_prompts",
    "shapes_captions",
    "global_batch_indices",
    "load_prompt_set",
    "load_prompts",
    "load_split",
    "local_batch",
    "prepare",
    "prepare_prompts",
    "read_prompt_file",
    "to_model_range",
    "to_uint8",
]
