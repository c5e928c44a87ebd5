"""hpcdl/models.py: the workshop architectures are configs; bad architectures are refused."""

from __future__ import annotations

import pytest

from hpcdl import config, models
from hpcdl.errors import ConfigError, UserError

MNIST = (28, 28, 1)


@pytest.mark.parametrize(
    ("config_file", "overrides", "expected"),
    [
        ("configs/mnist_mlp_64.yaml", [], 55_050),
        ("configs/mnist_mlp_512.yaml", [], 669_706),
        ("configs/mnist_mlp_512.yaml", ["depth=3"], 932_362),
        ("configs/fashion_cnn.yaml", [], 1_413_834),
    ],
)
def test_workshop_parameter_counts(config_file: str, overrides: list[str], expected: int) -> None:
    params = config.load(config_file, overrides).params
    assert models.build_model(params, MNIST, 10).count_params() == expected


def test_fashion_cnn_layers_are_the_workshop_ones() -> None:
    model = models.build_model(config.load("configs/fashion_cnn.yaml").params, MNIST, 10)
    convs = [(layer.filters, layer.kernel_size) for layer in model.layers if "conv" in layer.name]
    assert convs == [(64, (7, 7)), (128, (3, 3)), (128, (3, 3)), (256, (3, 3)), (256, (3, 3))]
    dense = [
        layer.units
        for layer in model.layers
        if layer.name.startswith("dense") and hasattr(layer, "units")
    ]
    assert dense == [128, 64]
    assert [layer.rate for layer in model.layers if layer.name.startswith("dropout")] == [0.5, 0.5]


def test_batch_norm_and_activation() -> None:
    params = config.load("configs/smoke.yaml", ["batch_norm=true", "activation=tanh"]).params
    model = models.build_model(params, (8, 8, 1), 10)
    names = [layer.name for layer in model.layers]
    assert "dense1_bn" in names and model.get_layer("dense1_act").activation.__name__ == "tanh"


def test_cnn_too_deep_names_the_layer() -> None:
    params = config.load("configs/smoke.yaml", ["family=cnn", "blocks=4"]).params
    with pytest.raises(
        ConfigError, match=r"8x8 images.*block 4 \(layer block4_pool\).*blocks <= 3"
    ):
        models.build_model(params, (8, 8, 1), 10)
    models.check_architecture({**params, "blocks": 3}, (8, 8, 1))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("family=resnet", r"model\.family: 'resnet' is not one of \['mlp', 'cnn'\]"),
        ("model.widht=3", r"model: Additional properties are not allowed \('widht' was unexpected"),
        ("depth=0", r"model\.depth: 0 is less than the minimum of 1"),
        ("width=0", r"model\.width: 0 is less than the minimum of 1"),
        ("dropout=1.0", r"model\.dropout: 1\.0 is greater than or equal to the maximum of 1"),
        ("dropout=-0.1", r"model\.dropout: -0\.1 is less than the minimum of 0"),
    ],
)
def test_bad_model_parameters(override: str, message: str) -> None:
    with pytest.raises(UserError, match=r"configs/smoke\.yaml: " + message):
        config.load("configs/smoke.yaml", [override])


@pytest.mark.parametrize(("precision", "compute"), [("float16", "float16"),
                                                    ("bfloat16", "bfloat16"), (None, "float32")])
def test_mixed_precision_computes_low_keeps_variables_and_softmax_float32(
        precision: str | None, compute: str) -> None:
    from hpcdl import train

    params = config.load("configs/fashion_cnn.yaml",
                         [f"train.mixed_precision={precision or 'null'}"]).params
    try:
        model, _ = train._compiled_model(params, _info(), size=1)
        hidden = model.get_layer("dense1")
        assert hidden.compute_dtype == compute and hidden.variable_dtype == "float32"
        assert model.get_layer("classes").compute_dtype == "float32"  # the softmax
        assert model.output.dtype == "float32"
        # float16 alone needs loss scaling (bfloat16 has float32's exponent range)
        scaled = type(model.optimizer).__name__.startswith("LossScaleOptimizer")
        assert scaled == (precision == "float16")
    finally:  # the policy is process-wide: back to float32 for the tests after this one
        models.build_model(config.load("configs/fashion_cnn.yaml").params, MNIST, 10)


def _info() -> object:
    from hpcdl import data

    return data.DatasetInfo("x.h5", "fashion", 10, tuple("0123456789"), MNIST, "uint8",
                            {"train": 10, "val": 0, "test": 0})
