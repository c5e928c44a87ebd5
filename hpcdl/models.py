"""Keras 2 builders for the `mlp` and `cnn` families; the workshop models are parameter choices.

mlp: flatten -> `depth` dense layers (first `width` units, each next x `width_factor`), each
     optionally batch-normalised, activated, then dropout -> softmax.
cnn: `blocks` conv blocks (same padding; block b has filters * 2**b filters, `convs_per_block`
     convs, `first_block_convs` in block 1, the first conv with `first_kernel_size`), each ending
     in 2x2 max-pooling -> flatten -> the mlp's dense stack -> softmax.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hpcdl.errors import ConfigError


def dense_widths(params: Mapping[str, Any]) -> list[int]:
    """Units of each hidden dense layer."""
    widths = [
        max(1, round(params["width"] * params["width_factor"] ** i)) for i in range(params["depth"])
    ]
    return widths


def conv_layout(params: Mapping[str, Any]) -> list[list[tuple[int, int]]]:
    """Per block, the (filters, kernel_size) of each conv."""
    blocks = []
    for b in range(params["blocks"]):
        n_convs = (
            (params.get("first_block_convs") or params["convs_per_block"])
            if b == 0
            else params["convs_per_block"]
        )
        filters = params["filters"] * 2**b
        convs = [(filters, params["kernel_size"]) for _ in range(n_convs)]
        blocks.append(convs)
    if params.get("first_kernel_size"):
        blocks[0][0] = (blocks[0][0][0], params["first_kernel_size"])
    return blocks


def check_architecture(params: Mapping[str, Any], input_shape: tuple[int, ...]) -> None:
    """Refuse a model that cannot be built for these inputs, naming the offending layer.

    Only what configs/schema.yaml cannot express, as it does not know the dataset: the family,
    depth, width and dropout were validated with the config.
    """
    if params["family"] != "cnn":
        return
    height, width = input_shape[0], input_shape[1]
    for b in range(params["blocks"]):
        if height < 2 or width < 2:
            usable = b
            raise ConfigError(
                f"model: cnn too deep for {input_shape[0]}x{input_shape[1]} images: the "
                f"max-pooling of block {b + 1} (layer block{b + 1}_pool) would shrink a "
                f"{height}x{width} feature map to nothing; use blocks <= {usable}"
            )
        height, width = height // 2, width // 2


def build_model(params: Mapping[str, Any], input_shape: tuple[int, ...], n_classes: int) -> Any:
    """An uncompiled Keras 2 model for `params` (model section plus any train keys, ignored)."""
    from tensorflow import keras

    check_architecture(params, input_shape)
    # train.mixed_precision: layers compute in float16/bfloat16, variables stay float32. Set
    # for every model built: a worker builds one per trial, and trials may differ.
    precision = params.get("mixed_precision")
    keras.mixed_precision.set_global_policy(f"mixed_{precision}" if precision else "float32")
    layers = keras.layers
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    if params["family"] == "cnn":
        for b, convs in enumerate(conv_layout(params), start=1):
            for c, (filters, kernel) in enumerate(convs, start=1):
                x = layers.Conv2D(
                    filters,
                    kernel,
                    padding="same",
                    name=f"block{b}_conv{c}",
                    use_bias=not params["batch_norm"],
                )(x)
                if params["batch_norm"]:
                    x = layers.BatchNormalization(name=f"block{b}_bn{c}")(x)
                x = layers.Activation(params["activation"], name=f"block{b}_act{c}")(x)
            x = layers.MaxPooling2D(2, name=f"block{b}_pool")(x)
    x = layers.Flatten(name="flatten")(x)
    for i, units in enumerate(dense_widths(params), start=1):
        x = layers.Dense(units, name=f"dense{i}", use_bias=not params["batch_norm"])(x)
        if params["batch_norm"]:
            x = layers.BatchNormalization(name=f"dense{i}_bn")(x)
        x = layers.Activation(params["activation"], name=f"dense{i}_act")(x)
        if params["dropout"] > 0:
            x = layers.Dropout(params["dropout"], name=f"dropout{i}")(x)
    # the softmax in float32 whatever the policy: float16 probabilities underflow in the loss
    outputs = layers.Dense(n_classes, activation="softmax", name="classes", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=params["family"])
