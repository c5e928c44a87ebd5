"""hpcdl: hyperparameter sweeps of data-parallel Keras training on HPC clusters."""

import os

# Horovod 0.28.1 cannot average gradients under Keras 3 and does not say so (stack.md): every
# hpcdl process must see Keras 2 (tf-keras), and the switch only works before TensorFlow loads.
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"
