"""Issue 16 probe (2026-11-23, not part of carrot yet): a sampled Shapley map of the cells for the deletion game
(logit when a set of cells is blurred), K antithetic permutations; each permutation telescopes, so the map sums to
f(x) - f(blurred x) exactly for any K. Measured with bench_pixels' protocol on its images (K = 4, CPU):
  Fashion-MNIST / EfficientNet-Lite0, 30 images: deletion 0.203 (occlusion 0.229, pixel split 0.303), insertion 0.700; 8.1 s/image
  ELPV / EfficientNet-Lite0, 40 images: deletion -0.004 (pixel split 0.153, occlusion 0.344), insertion 0.721; 8.0 s/image
Usage: python docs/dev/issue16_shapley_probe.py RUN RESULT.json N_TEST K
"""
import json, sys, time
import numpy as np, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from carrot.attribution.pixels import blur, cell_boxes, default_sigma, pixel_curves, pooled
from carrot.run.pipeline import Carrot

run, res, n, K = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model = Carrot.load(run)
rng = np.random.default_rng(0)
rows = np.sort(rng.choice(len(model.test_records_), min(n, len(model.test_records_)), replace=False))
prng = np.random.default_rng(1)
dele, ins, spans, secs = [], [], [], []
for i in rows.tolist():
    x = model.inputs([model.test_records_[i][0]])[0]
    with torch.no_grad():
        _, grid = model.backbone(x[None])
    c = int(model.pixel_logits(x[None])[0].argmax())
    size = tuple(x.shape[-2:]); boxes = cell_boxes(grid, size); N = len(boxes)
    xb = blur(x[None], default_sigma(grid, size))[0]
    t0 = time.perf_counter()
    phi = np.zeros(N)
    perms = []
    for k in range(K // 2):
        p = prng.permutation(N); perms += [p, p[::-1]]  # antithetic pairs
    for p in perms:
        m = torch.zeros(N + 1, 1, *size)
        for r in range(1, N + 1):
            m[r] = m[r - 1]
            y0, y1, x0, x1 = boxes[p[r - 1]]
            m[r, :, y0:y1, x0:x1] = 1
        inp = x[None] * (1 - m) + xb[None] * m
        f = np.concatenate([model.pixel_logits(inp[s:s + 50]) for s in range(0, N + 1, 50)])[:, c]
        phi[p] += f[:-1] - f[1:]
    phi /= len(perms)
    secs.append(time.perf_counter() - t0)
    cur = pixel_curves(model.pixel_logits, x, c, grid, np.argsort(-phi, kind="stable"), 16)
    dele.append(cur.auc("deletion")); ins.append(cur.auc("insertion")); spans.append(cur.span)
d = json.load(open(res))
print("shapley K=%d: deletion %.3f insertion %.3f, %.2f s/image" % (K, pooled(dele, spans)["mean"], pooled(ins, spans)["mean"], np.mean(secs)))
for m in ("carrot_pixel", "carrot_occlusion", "captum_ig"):
    if m in d["per_image"]:
        print(m, "deletion %.3f" % pooled(d["per_image"][m]["deletion"], spans)["mean"], "insertion %.3f" % pooled(d["per_image"][m]["insertion"], spans)["mean"])
dd = np.asarray(dele) - np.asarray(d["per_image"]["carrot_occlusion"]["deletion"])
print("paired shapley - occlusion deletion", pooled(dd, spans))
dd = np.asarray(dele) - np.asarray(d["per_image"]["carrot_pixel"]["deletion"])
print("paired shapley - split deletion", pooled(dd, spans))
