"""The model registry: every entry builds, runs, learns and names a Grad-CAM layer that exists."""

from __future__ import annotations

import pytest
import torch

from fracdet.models import create_model, get_spec, list_models
from fracdet.models.scoring import BOX_CHANNELS


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_runs_and_every_parameter_learns(name):
    torch.manual_seed(0)
    spec = get_spec(name)
    model = create_model(name)
    size = spec.preprocess.input_size
    outputs = model(torch.randn(2, 3, size, size))
    if spec.task == "localise":  # image logit and a stride-8 fracture map (then a detector's box channels)
        channels = 1 + BOX_CHANNELS if name.startswith("detector") else 1
        assert outputs[0].shape == (2,) and outputs[1].shape == (2, channels, size // 8, size // 8)
    else:
        assert outputs.shape == (2, 2)
        outputs = (outputs,)
    assert all(torch.isfinite(o).all() for o in outputs)
    sum(o.sum() for o in outputs).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert isinstance(model.get_submodule(spec.cam_layer), torch.nn.Module)


def test_paper_cnn_follows_the_paper_input():
    spec = get_spec("paper_cnn")
    assert spec.preprocess.input_size == 150
    assert spec.preprocess.mean == (0.5, 0.5, 0.5) and spec.preprocess.std == (0.5, 0.5, 0.5)  # [0,1] -> [-1,1]
    with pytest.raises(ValueError, match="from scratch"):
        create_model("paper_cnn", pretrained=True)


def test_efficientnet_lite0_starts_from_offline_imagenet_weights():
    scratch = create_model("efficientnet_lite0")
    pretrained = create_model("efficientnet_lite0", pretrained=True)
    stem = "conv_stem.weight"
    assert not torch.equal(scratch.state_dict()[stem], pretrained.state_dict()[stem])
    assert pretrained.get_classifier().out_features == 2


def test_local_weights_file_is_loaded(tmp_path):
    from safetensors.torch import save_file

    source = create_model("paper_cnn")
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = create_model("paper_cnn", weights=tmp_path / "w.safetensors")
    assert all(
        torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values(), strict=True)
    )
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        create_model("paper_cnn", weights=tmp_path / "missing.safetensors")


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(KeyError, match="paper_cnn"):
        get_spec("resnet1000")
