"""The offline built-in weights reproduce their originals."""
import json

import numpy as np
import pytest
import timm
import torch

from carrot.features.weights import BUILTINS, builtin_state_dict, package_file

pytestmark = pytest.mark.slow


def test_dinov2_tokens_match_onnxruntime():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    spec = BUILTINS["dinov2_vits14"]
    state, _ = builtin_state_dict("dinov2_vits14", 224)
    model = timm.create_model(spec.timm_name, pretrained=False, img_size=224, num_classes=0)
    model.load_state_dict(state, strict=True)
    model.eval()
    graph = onnx.load(str(package_file(spec.module, spec.relpath, "")))
    out_name = "/backbone/layernorm/Add_1_output_0"  # final LayerNorm output: all tokens
    graph.graph.output.append(onnx.helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    ref = sess.run([out_name], {"input_image": x})[0]
    with torch.no_grad():
        ours = model.forward_features(torch.from_numpy(x)).numpy()
    assert ours.shape == ref.shape == (2, 257, 384)
    np.testing.assert_allclose(ours, ref, atol=2e-4 * np.abs(ref).max())


def test_converted_weights_are_cached_and_validated(tmp_path):
    s1, h1 = builtin_state_dict("efficientnet_lite0", 224, cache_dir=tmp_path)
    files = sorted(p.name for p in (tmp_path / "weights").iterdir())
    assert any(f.endswith(".safetensors") for f in files) and any(f.endswith(".json") for f in files)
    st = next((tmp_path / "weights").glob("*.safetensors"))
    st.write_bytes(st.read_bytes()[:-10] + b"corrupted!")  # a damaged cache is redone, not used
    s2, h2 = builtin_state_dict("efficientnet_lite0", 224, cache_dir=tmp_path)
    assert h1 == h2 and all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.mark.parametrize("image,classes", [("chelsea", range(281, 286)), ("coffee", (967, 968, 504))])
def test_efficientnet_lite0_imagenet_predictions(image, classes):
    """The converted checkpoint classifies real photos: a tabby cat and a cup of coffee."""
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    state, _ = builtin_state_dict("efficientnet_lite0", 224)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(state, strict=True)
    model.eval()
    cfg = timm.data.resolve_model_data_config(model)
    x = timm.data.create_transform(**cfg)(Image.fromarray(getattr(data, image)()))[None]
    with torch.no_grad():
        top = model(x).softmax(-1)[0].topk(3).indices.tolist()
    assert top[0] in classes, top


def test_a_garbage_weights_sidecar_is_rebuilt_with_a_warning(tmp_path):
    import warnings

    s1, _ = builtin_state_dict("efficientnet_lite0", 224, cache_dir=tmp_path)
    sidecar = next((tmp_path / "weights").glob("*.json"))
    sidecar.write_bytes(b"\x00garbage{")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        s2, _ = builtin_state_dict("efficientnet_lite0", 224, cache_dir=tmp_path)
    assert any("is unreadable; converting the built-in weights again" in str(w.message) for w in seen)
    assert all(torch.equal(s1[k], s2[k]) for k in s1) and json.loads(sidecar.read_text())["name"] == "efficientnet_lite0"
    mode = next((tmp_path / "weights").glob("*.safetensors")).stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask()  # as every other file carrot writes, not 0600


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
