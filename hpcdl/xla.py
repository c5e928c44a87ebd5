"""An XLA-compiled training step for several ranks, with Horovod's allreduce left outside XLA.

Keras' own `jit_compile` compiles the whole step, the optimizer's gradient allreduce included,
and Horovod 0.28 has no XLA CPU kernel for it (XLA fails at the first step). Here XLA compiles
forward pass, loss and gradients; the gradients are then averaged over ranks
(`parallel.average_gradients`) and applied by the plain optimizer, outside XLA. Under
`train.mixed_precision: float16` the optimizer is Keras' LossScaleOptimizer: the loss is scaled
and the gradients unscaled inside XLA, and as every rank applies the same averaged gradients,
every rank's finite check, and so its dynamic loss scale, agrees. Evaluation is not compiled.

Keras is imported inside the factory: importing train must not load TensorFlow before
`parallel.init` has set its thread pools.
"""

from __future__ import annotations

from typing import Any

from hpcdl import parallel


def allreduce_outside_xla(model: Any) -> Any:
    """`model`'s layers (the very same weights) in a model whose training step compiles its
    gradients with XLA and averages them over ranks outside XLA; compile it with the plain
    optimizer and jit_compile=False."""
    import tensorflow as tf
    from tensorflow import keras

    class XlaGradientsModel(keras.Model):
        """Forward pass, loss and gradients in XLA; allreduce and update outside it."""

        def train_step(self, data: Any) -> dict[str, Any]:
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            grads, y_pred = self.xla_gradients(x, y, sample_weight)
            grads = parallel.average_gradients(grads)
            self.optimizer.apply_gradients(zip(grads, self.trainable_variables, strict=True))
            return self.compute_metrics(x, y, y_pred, sample_weight)

        @tf.function(jit_compile=True)
        def xla_gradients(self, x: Any, y: Any, sample_weight: Any) -> tuple[list[Any], Any]:
            """This rank's gradients and predictions; the loss metric is updated here."""
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.compute_loss(x, y, y_pred, sample_weight)
            # a LossScaleOptimizer scales the loss and unscales the gradients here
            grads_and_vars = self.optimizer.compute_gradients(
                loss, self.trainable_variables, tape=tape)
            return [grad for grad, _ in grads_and_vars], y_pred

    return XlaGradientsModel(model.inputs, model.outputs, name=model.name)
