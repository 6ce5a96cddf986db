import pytest
import timm
import torch

from carrot.features.backbone import TokenBackbone, create_backbone, patch_centres
from carrot.errors import CarrotError


def test_patch_centres_are_row_major_in_unit_box():
    P = patch_centres((2, 3))
    expected = torch.tensor([[-2 / 3, -0.5], [0, -0.5], [2 / 3, -0.5], [-2 / 3, 0.5], [0, 0.5], [2 / 3, 0.5]])
    assert torch.allclose(P, expected, atol=1e-6)


@pytest.mark.parametrize(
    "name,kwargs,prefix",
    [
        ("vit_tiny_patch16_224", {}, 1),
        ("deit_tiny_distilled_patch16_224", {}, 2),
        ("vit_tiny_patch16_224", {"reg_tokens": 4}, 5),
    ],
)
def test_vit_prefix_tokens_are_stripped(name, kwargs, prefix):
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=48, **kwargs)
    bb = TokenBackbone(model, name, name, "x", 48, torch.device("cpu"), {"input_size": (3, 48, 48)})
    assert bb.num_prefix_tokens == prefix
    x = torch.randn(2, 3, 48, 48)
    tokens, grid = bb(x)
    assert grid == (3, 3) and tokens.shape == (2, 9, 192)
    with torch.no_grad():
        ref = model.forward_features(x)[:, prefix:]
    assert torch.equal(tokens, ref)


def test_token_count_mismatch_fails_loudly():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=48)
    bb = TokenBackbone(model, "v", "v", "x", 48, torch.device("cpu"), {"input_size": (3, 48, 48)})
    bb.num_prefix_tokens = 0  # pretend the class token is a patch
    with pytest.raises(CarrotError, match="10 patch tokens .* 3x3 grid"):
        bb(torch.randn(1, 3, 48, 48))


def test_convnet_feature_map_cells_are_regions():
    bb = create_backbone("resnet18", img_size=64, pretrained=False, device="cpu")
    tokens, grid = bb(torch.randn(2, 3, 64, 64))
    assert grid == (2, 2) and tokens.shape == (2, 4, 512)
    with torch.no_grad():
        fmap = bb.model.forward_features(torch.randn(1, 3, 64, 64))
    assert fmap.shape[1] == 512


def test_backbone_is_frozen_and_uses_timm_data_config(tiny_vit):
    assert not any(p.requires_grad for p in tiny_vit.model.parameters())
    assert not tiny_vit.model.training
    assert tiny_vit.data_config["input_size"] == (3, 32, 32)
    assert tiny_vit.data_config["mean"] == timm.data.resolve_model_data_config(tiny_vit.model)["mean"]


def test_unknown_backbone_and_bad_checkpoint_are_named(tmp_path):
    with pytest.raises(CarrotError, match="unknown model 'no_such_net'"):
        create_backbone("no_such_net", device="cpu")
    with pytest.raises(CarrotError, match="checkpoint: file not found"):
        create_backbone("vit_tiny_patch16_224", img_size=32, checkpoint=str(tmp_path / "x.pth"), device="cpu")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CarrotError, match="refused .* not a torch checkpoint at all"):
        create_backbone("vit_tiny_patch16_224", img_size=32, checkpoint=str(junk), device="cpu")
    with pytest.raises(CarrotError, match="device"):
        create_backbone("vit_tiny_patch16_224", img_size=32, pretrained=False, device="tpu")


def test_local_checkpoint_roundtrip(tmp_path, tiny_vit):
    path = tmp_path / "w.pth"
    torch.save({"state_dict": tiny_vit.model.state_dict()}, path)
    bb = create_backbone("vit_tiny_patch16_224", img_size=32, checkpoint=str(path), device="cpu")
    assert bb.weights_id == tiny_vit.weights_id
    wrong = tmp_path / "wrong.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), wrong)
    with pytest.raises(CarrotError, match="does not fit timm model"):
        create_backbone("vit_tiny_patch16_224", img_size=32, checkpoint=str(wrong), device="cpu")


@pytest.mark.parametrize("name,size,grid,layout", [
    ("swin_tiny_patch4_window7_224", 224, (7, 7), "NHWC"),        # channels-last feature map (output_fmt)
    ("convnext_atto", 64, (2, 2), "NCHW"),
    ("maxvit_nano_rw_256", 256, (8, 8), "NCHW"),
    ("beit_base_patch16_224", 64, (4, 4), "tokens"),              # class token
    ("eva02_tiny_patch14_224", 56, (4, 4), "tokens"),             # class token, rotary positions
    ("levit_128s", 224, (4, 4), "tokens"),                        # hierarchical tokens, no patch_embed.patch_size
])
def test_timm_architectures_give_row_major_regions(name, size, grid, layout):
    """Region (i, j) of the grid is feature-map cell (i, j) / patch token i * w + j of timm's own output."""
    bb = create_backbone(name, img_size=size, pretrained=False, device="cpu")
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens, got = bb(x)
    assert got == grid and tokens.shape == (2, grid[0] * grid[1], bb.num_features)
    with torch.no_grad():
        y = bb.model.forward_features(x)
    i, j = grid[0] - 1, 0  # an off-diagonal cell: a transposed layout would not match
    ref = {"NHWC": lambda: y[:, i, j], "NCHW": lambda: y[:, :, i, j],
           "tokens": lambda: y[:, bb.num_prefix_tokens + i * grid[1] + j]}[layout]()
    torch.testing.assert_close(tokens[:, i * grid[1] + j], ref.float())


def test_token_model_without_patch_size_needs_a_square_grid():
    class Tokens(torch.nn.Module):  # a token model with no patch_embed, returning n tokens
        num_features = 8

        def __init__(self, n: int) -> None:
            super().__init__()
            self.n = n

        def forward_features(self, x):
            return torch.zeros(x.shape[0], self.n, 8)

    bb = TokenBackbone(Tokens(16), "t", "t", "x", 32, torch.device("cpu"), {"input_size": (3, 32, 32)})
    assert bb(torch.randn(1, 3, 32, 32))[1] == (4, 4)
    bb = TokenBackbone(Tokens(15), "t", "t", "x", 32, torch.device("cpu"), {"input_size": (3, 32, 32)})
    with pytest.raises(CarrotError, match="15 tokens for a 32x32 input .* cannot lay them on a grid"):
        bb(torch.randn(1, 3, 32, 32))


def test_small_real_images_pass_and_tiny_files_are_refused(tmp_path):
    from PIL import Image

    from carrot.data import load_image

    conv = create_backbone("resnet18", img_size=64, pretrained=False, device="cpu")
    vit = create_backbone("vit_tiny_patch16_224", img_size=32, pretrained=False, device="cpu")
    assert (conv.min_side, vit.min_side) == (16, 16)
    Image.new("L", (28, 28), 90).save(tmp_path / "fmnist.png")  # a Fashion-MNIST-sized photo
    Image.new("RGB", (6, 6)).save(tmp_path / "tiny.png")
    for bb in (conv, vit):
        x = bb.transform()(load_image(tmp_path / "fmnist.png", bb.min_side))
        assert bb(x[None])[0].shape[0] == 1
        with pytest.raises(CarrotError, match="smaller than one 16-px patch"):
            load_image(tmp_path / "tiny.png", bb.min_side)


def test_precision_auto_is_bfloat16_only_where_the_cpu_multiplies_it_natively(monkeypatch):
    from carrot.features.backbone import resolve_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for flags, want in (((False, False), "float32"), ((True, False), "bfloat16"), ((False, True), "bfloat16")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: flags[0])
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: flags[1])
        assert resolve_precision("auto", cpu) == want
    assert resolve_precision("auto", cuda) == "float32"
    assert resolve_precision("auto", cpu, transformer=False) == "float32"  # a ConvNet's tokens move 10%: float32
    assert resolve_precision("bfloat16", cpu, transformer=False) == "bfloat16"
    assert resolve_precision("bfloat16", cpu) == "bfloat16" and resolve_precision("float32", cpu) == "float32"
    with pytest.raises(CarrotError, match="backbone.precision: expected auto, float32 or bfloat16, got 'half'"):
        resolve_precision("half", cpu)
    from carrot.config import RunConfig

    with pytest.raises(CarrotError, match="backbone.precision: expected one of auto, float32, bfloat16, got 'fp8'"):
        RunConfig.from_dict({"backbone": {"precision": "fp8"}})


@pytest.mark.parametrize("name,size", [("vit_tiny_patch16_224", 32), ("resnet18", 64)])
def test_bfloat16_tokens_are_float32_tensors_close_to_the_float32_ones(name, size):
    torch.manual_seed(0)
    bb32 = create_backbone(name, img_size=size, pretrained=False, device="cpu", precision="float32")
    bb16 = create_backbone(name, img_size=size, pretrained=False, device="cpu", precision="bfloat16")
    assert bb16.describe()["precision"] == "bfloat16" and bb32.describe()["precision"] == "float32"
    assert bb16.weights_id == bb32.weights_id
    x = torch.randn(2, 3, size, size)
    (t32, g32), (t16, g16) = bb32(x), bb16(x)
    assert g16 == g32 and t16.dtype == torch.float32 and t16.shape == t32.shape
    rel = float((t16 - t32).norm() / t32.norm())
    assert 0 < rel < 0.05  # bfloat16 keeps 8 bits of mantissa: a small, nonzero difference


def test_the_token_cache_of_another_precision_is_another_cache():
    from carrot.features.cache import cache_key

    m = {"version": 4, "timm_name": "t", "weights_id": "w", "input_size": [3, 8, 8], "dtype": "float16",
         "dataset_fingerprint": "f", "blocks": 1}
    assert cache_key(m) == cache_key({**m, "precision": "float32"})  # float32: the key of every cache before it
    assert cache_key({**m, "precision": "bfloat16"}) != cache_key(m)


def test_a_run_records_its_backbone_precision_and_speed_and_explains_with_it(fit_tiny, tmp_path):
    import json

    from carrot.run.pipeline import Carrot

    run = fit_tiny(tmp_path / "bf16", backbone={**_tiny(), "precision": "bfloat16"})
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["backbone_precision"] == "bfloat16" and metrics["backbone_images_per_second"] > 0
    meta = json.loads((run / "run.json").read_text())
    assert meta["backbone"]["precision"] == "bfloat16"
    model = Carrot.load(run)
    assert model.config.backbone.precision == "bfloat16" and model.backbone.precision == "bfloat16"
    run32 = fit_tiny(tmp_path / "auto")  # 'auto' is resolved at fit and pinned in the run, whatever loads it later
    meta = json.loads((run32 / "run.json").read_text())
    assert meta["backbone"]["precision"] in ("float32", "bfloat16")
    assert Carrot.load(run32).backbone.precision == meta["backbone"]["precision"]
    del meta["backbone"]["precision"]  # a run fitted before backbone.precision: float32, as its tokens were
    (run32 / "run.json").write_text(json.dumps(meta))
    assert Carrot.load(run32).backbone.precision == "float32"


def _tiny() -> dict:
    from conftest import TINY_BACKBONE

    return dict(TINY_BACKBONE)
