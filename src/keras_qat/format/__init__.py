"""The ``.kqat`` file format: what the artifact writer and the integer runtime share.

* :mod:`.container`: the checksummed container (magic, version, manifest, payload);
* :mod:`.packing`: integers packed at their bit width;
* :mod:`.manifest`: the op list and the manifest's layout;
* :mod:`.atomic`: atomic file writes (temporary name, then rename).

Nothing here imports Keras or TensorFlow: the runtime loads a ``.kqat`` file with NumPy alone.
"""

from keras_qat.format.container import FORMAT_VERSION, ArtifactError
from keras_qat.format.manifest import OPS, SOFTMAX_BITS

__all__ = ["ArtifactError", "FORMAT_VERSION", "OPS", "SOFTMAX_BITS"]
