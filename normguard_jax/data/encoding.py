"""PNG encoding for the offline builders, with Pillow instead of a TensorFlow graph."""

import io

import numpy as np
from PIL import Image


def encode_png(image: np.ndarray) -> bytes:
    """Losslessly encodes one uint8 (H, W, 1) or (H, W, 3) image as PNG bytes.

    `tfds.features.Image` stores these bytes as they are; giving it bytes rather than an
    array skips its TensorFlow encoder, whose start-up costs seconds per build.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 (H, W, 1|3), got {image.dtype} {image.shape}")
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()
