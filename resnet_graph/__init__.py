"""resnet-graph: residual networks on CIFAR-10 in TensorFlow's graph style.

Importing the package turns TensorFlow's oneDNN CPU kernels on
(``TF_ENABLE_ONEDNN_OPTS=1``) unless the variable is already set or
TensorFlow is already imported: TensorFlow itself enables oneDNN only on
CPUs with AVX512_VNNI/AVX512_BF16/AMX-class units, and on an AVX2-only EPYC
the default (Eigen) kernels trained ResNet-32 at 0.57x the oneDNN speed
(docs/performance.md). This must happen before TensorFlow is first
imported, which is why it lives here; ``resnet-graph info`` reports the
outcome (:func:`resnet_graph.runtime.onednn_state`).
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"

ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"
# The variable as the user's environment had it (None: unset), and whether
# TensorFlow was imported before this package could set it.
ONEDNN_USER_VALUE = _os.environ.get(ONEDNN_ENV)
TENSORFLOW_IMPORTED_FIRST = "tensorflow" in _sys.modules
if ONEDNN_USER_VALUE is None and not TENSORFLOW_IMPORTED_FIRST:
    _os.environ[ONEDNN_ENV] = "1"
