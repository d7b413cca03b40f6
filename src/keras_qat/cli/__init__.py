"""The ``keras-qat`` command line (:mod:`keras_qat.cli.app`)."""

from keras_qat.cli.app import main

__all__ = ["main"]
