"""``python -m keras_qat``: the ``keras-qat`` command line."""

import sys

from keras_qat.cli import main

sys.exit(main())
