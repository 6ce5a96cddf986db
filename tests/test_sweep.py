import numpy as np

from carrot.features.cache import extract
from carrot.config import BackboneConfig, DiffusionConfig, GraphConfig, RunConfig
from carrot.data import load_imagefolder
from carrot.run.pipeline import Carrot
from carrot.audit.sweep import embeddings_over_t, t_sweep

PLAIN = BackboneConfig(blocks=1, global_tokens=False)  # the patch readout of the last block (no choice to make)


def test_sweep_embeddings_equal_the_pipeline_at_each_t(tmp_path, synthetic_root, tiny_vit):
    train, test = load_imagefolder(synthetic_root)
    st, se = (extract(tiny_vit, s, tmp_path, progress=False) for s in (train, test))
    ts = [0.0, 0.7, 3.0]
    G = embeddings_over_t(st, ts, GraphConfig())
    for i, t in enumerate(ts):
        model = Carrot(RunConfig(backbone=PLAIN, diffusion=DiffusionConfig(t=t)))
        np.testing.assert_allclose(G[i], model.embed_store(st), rtol=1e-9, atol=1e-10)
    rows = t_sweep(st, se, ts, GraphConfig(), "auto")
    assert [r["t"] for r in rows] == ts and all(0 <= r["test_accuracy"] <= 1 and "loo_accuracy" in r for r in rows)


def test_embed_store_batches_by_graph_memory(tmp_path, synthetic_root, tiny_vit):
    train, _ = load_imagefolder(synthetic_root)
    st = extract(tiny_vit, train, tmp_path, progress=False)
    model = Carrot(RunConfig(backbone=PLAIN, diffusion=DiffusionConfig(t=2.0)))
    whole = model.embed_store(st, batch=len(st))
    one_by_one = model.embed_store(st, graph_bytes=1)  # budget below one graph: batches of one image
    np.testing.assert_allclose(one_by_one, whole, rtol=1e-12, atol=1e-13)


def test_streamed_embeddings_equal_the_cached_path(tmp_path, synthetic_root):
    cfg = RunConfig.from_dict({"backbone": {"name": "vit_tiny_patch16_224", "img_size": 32, "pretrained": False,
                                            "batch_size": 5, "blocks": 1, "global_tokens": False},
                                "device": "cpu"})
    model = Carrot(cfg)
    train, _ = load_imagefolder(synthetic_root)
    # same backbone batches as the stream (float32 results can depend on the batch composition)
    cached = model.embed_store(extract(model.backbone, train, tmp_path, progress=False, batch_size=5))
    np.testing.assert_allclose(model.embed_dataset(train), cached, rtol=1e-12, atol=1e-13)
