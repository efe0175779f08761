import numpy as np
import pytest
import torch

from collage_inference.errors import ConfigError, ExportError, ModelError
from collage_inference.modelspec import ModelConfig, ModelMeta
from collage_inference.onnxfile import onnx_session, read_onnx_meta
from collage_inference.training.checkpoint import load_checkpoint, save_checkpoint
from collage_inference.training.export import export_onnx
from collage_inference.training.models import build_model, model_cost, resnet_config
from collage_inference.training.presets import PRESETS

CLASSES = tuple(f"c{i}" for i in range(10))


def small_collage(grid: int) -> ModelConfig:
    return ModelConfig(
        "collage", 10, image_size=8, grid=grid, stem_width=8, widths=(8, 16), blocks=(1, 1), strides=(2, 2)
    )


@pytest.mark.parametrize("grid", [1, 2, 3, 4, 5])
def test_collage_output_has_one_distribution_per_cell(grid):
    cfg = small_collage(grid)
    out = build_model(cfg)(torch.rand(3, 1, cfg.input_size, cfg.input_size))
    assert out.shape == (3, grid * grid, 11)


def test_collage_cells_are_row_major():
    """Cell (row, col) of the output must react to the tile at (row, col) of the input."""
    torch.manual_seed(0)
    cfg = small_collage(3)
    model = build_model(cfg).eval()
    base = torch.zeros(1, 1, 24, 24)
    with torch.no_grad():
        ref = model(base)
        for cell in range(9):
            row, col = divmod(cell, 3)
            x = base.clone()
            x[..., row * 8 + 3 : row * 8 + 5, col * 8 + 3 : col * 8 + 5] = 1.0  # tile centre only
            change = (model(x) - ref).abs().sum(-1)[0]
            assert int(change.argmax()) == cell


def test_scnn_shapes_and_resnet_options():
    cfg = ModelConfig("scnn", 10)
    assert build_model(cfg)(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    r18 = resnet_config(18, num_classes=7, in_channels=3, image_size=64)
    assert build_model(r18)(torch.rand(1, 3, 64, 64)).shape == (1, 7)
    assert model_cost(build_model(resnet_config(34, 10)), resnet_config(34, 10)).params > 2e7


def test_bad_configs_are_rejected():
    with pytest.raises(ConfigError, match="kind"):
        ModelConfig("mlp", 10)
    with pytest.raises(ConfigError, match="total stride"):
        build_model(ModelConfig("collage", 10, image_size=28, grid=2, strides=(2, 2, 2)))
    with pytest.raises(ConfigError, match="mean and std"):
        ModelConfig("scnn", 10, in_channels=3)


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "scnn"])
def test_shipped_collage_models_cost_about_one_scnn_pass(name):
    from collage_inference.training.sizing import HIGH, LOW

    scnn_cfg = PRESETS["scnn"][0]
    scnn = model_cost(build_model(scnn_cfg), scnn_cfg)
    cfg = PRESETS[name][0]
    collage = model_cost(build_model(cfg), cfg)
    assert LOW <= collage.flops / scnn.flops <= HIGH, f"{name}: {collage.flops / scnn.flops:.2f}x"


def test_flop_count_matches_hand_count():
    cfg = ModelConfig("scnn", 10, stem_width=4, widths=(4,), blocks=(1,), strides=(1,))
    # stem 1->4 3x3 on 28x28, two 4->4 3x3 convs, linear 4->10; FLOPs = 2 * MACs
    expected = 2 * (28 * 28 * 4 * 9 + 2 * 28 * 28 * 4 * 4 * 9 + 4 * 10)
    assert model_cost(build_model(cfg), cfg).flops == expected


def _meta(cfg: ModelConfig) -> ModelMeta:
    return ModelMeta("m", cfg, CLASSES, {"kind": "test", "fingerprint": "abc"}, {"val_accuracy": 0.5})


@pytest.mark.parametrize(
    "cfg",
    [ModelConfig("scnn", 10, stem_width=8, widths=(8, 16), blocks=(1, 1), strides=(2, 2)), small_collage(3)],
)
def test_checkpoint_round_trip_rebuilds_the_model(tmp_path, cfg):
    model = build_model(cfg).eval()
    save_checkpoint(tmp_path / "m.pt", model, _meta(cfg))
    loaded, meta = load_checkpoint(tmp_path / "m.pt")
    assert meta == _meta(cfg)
    x = torch.rand(2, 1, cfg.input_size, cfg.input_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


@pytest.mark.parametrize("cfg", [ModelConfig("scnn", 10), small_collage(2), small_collage(4)])
def test_onnx_export_matches_pytorch(tmp_path, cfg):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    report = export_onnx(model, _meta(cfg), tmp_path / "m.onnx")
    assert report.max_abs_diff <= 1e-4
    assert read_onnx_meta(tmp_path / "m.onnx") == _meta(cfg)
    x = np.random.default_rng(0).random((5, 1, cfg.input_size, cfg.input_size), np.float32)
    got = onnx_session(tmp_path / "m.onnx").run(None, {"input": x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(torch.from_numpy(x)).numpy(), atol=1e-4)


def test_export_refuses_a_mismatching_graph(tmp_path):
    cfg = small_collage(2)
    model = build_model(cfg).eval()
    export_onnx(model, _meta(cfg), tmp_path / "m.onnx")
    from collage_inference.training.export import parity_check

    with torch.no_grad():
        model.head.bias += 1.0  # PyTorch now disagrees with the exported graph
    with pytest.raises(ExportError, match="differ"):
        parity_check(model, tmp_path / "m.onnx")
