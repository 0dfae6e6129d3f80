#!/usr/bin/python3
"""Baselines for the demo model's validation numbers, scored with upstream's metrics.

    tools/demo_baselines.py TRAIN_DIR VALID_DIR

Build-time tool (Debian's python3-pil and python3-numpy); loupe itself never needs it.

Two baselines, each scored on VALID_DIR exactly as `loupe eval` scores a model (upstream's
validation metrics, README "Training"):

* error level analysis (ELA): the image re-saved as JPEG at quality 90 (Pillow, 4:2:0), the
  absolute difference per pixel (mean over R, G, B), averaged over 9 x 9 neighbourhoods: the
  local error map. Pixels whose local error exceeds a threshold are "forged"; the image score is
  the share of such pixels. The threshold is the one with the best pooled pixel F1 on TRAIN_DIR
  (chosen on training data only, never on the validation set).
* all forged: every pixel of every image forged, every image's probability 1.

Metrics (upstream's LitModel.on_validation_epoch_end): auc = roc_auc_score over the image scores
(ties 1/2); f1 (binary, zero_division=1) and iou (mean over the classes real and forged of
TP / (TP + FP + FN)) over the pooled pixels of the images whose mask has a forged pixel;
overall = (auc + f1 + iou) / 3. Targets are the 0/255 masks (dithering a 0/1 mask changes
nothing but for a draw of exactly 0).
"""
import os
import sys

import numpy as np
from PIL import Image, ImageFilter

QUALITY = 90
WINDOW = 9


def dataset(folder):
    images = sorted(f for f in os.listdir(os.path.join(folder, "images")) if not f.startswith("."))
    out = []
    for name in images:
        stem = os.path.splitext(name)[0]
        mask = None
        for ext in (".png", ".jpg", ".jpeg", ".ppm", ".pgm"):
            p = os.path.join(folder, "masks", stem + ext)
            if os.path.exists(p):
                mask = p
        out.append((os.path.join(folder, "images", name), mask))
    return out


def target(img_size, mask_path):
    if mask_path is None:
        return np.zeros((img_size[1], img_size[0]), bool)
    m = np.array(Image.open(mask_path).convert("L"))
    lo, hi = int(m.min()), int(m.max())
    if hi == lo:
        return np.zeros(m.shape, bool)
    return (m.astype(np.float64) - lo) / (hi - lo) >= 0.5


def ela_map(path):
    import io
    img = Image.open(path).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=QUALITY)
    again = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    diff = np.abs(np.asarray(img, np.float32) - np.asarray(again, np.float32)).mean(axis=2)
    # 9 x 9 box mean through an integral image (edges replicated)
    pad = WINDOW // 2
    d = np.pad(diff, pad, mode="edge")
    s = np.pad(d.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = diff.shape
    box = s[WINDOW:WINDOW + h, WINDOW:WINDOW + w] - s[:h, WINDOW:WINDOW + w] - s[WINDOW:WINDOW + h, :w] + s[:h, :w]
    return img.size, box / (WINDOW * WINDOW)


def auc(scores, labels):
    pos = [s for s, l in zip(scores, labels) if l]
    neg = [s for s, l in zip(scores, labels) if not l]
    if not pos or not neg:
        return float("nan")
    neg = np.sort(np.array(neg))
    total = 0.0
    for p in pos:
        total += np.searchsorted(neg, p, "left") + 0.5 * (np.searchsorted(neg, p, "right") - np.searchsorted(neg, p, "left"))
    return total / (len(pos) * len(neg))


def metrics(scores, labels, preds, targets):
    tp = fp = fn = tn = 0
    for pred, tgt in zip(preds, targets):
        if not tgt.any():
            continue
        tp += int(np.sum(pred & tgt)); fp += int(np.sum(pred & ~tgt))
        fn += int(np.sum(~pred & tgt)); tn += int(np.sum(~pred & ~tgt))
    f1 = 1.0 if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
    ious = [x for x in ((tp / (tp + fp + fn)) if tp + fp + fn else None, (tn / (tn + fp + fn)) if tn + fp + fn else None)
            if x is not None]
    iou = float(np.mean(ious)) if ious else float("nan")
    a = auc(scores, labels)
    return {"auc": a, "f1": f1, "iou": iou, "overall": (a + f1 + iou) / 3}


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    train, valid = dataset(sys.argv[1]), dataset(sys.argv[2])
    # threshold by pooled F1 on the training set
    candidates = np.linspace(0.5, 12.0, 47)
    tp = np.zeros(len(candidates)); fp = np.zeros(len(candidates)); fn = np.zeros(len(candidates))
    for path, mask in train:
        size, e = ela_map(path)
        t = target(size, mask)
        if not t.any():
            continue
        for k, th in enumerate(candidates):
            p = e > th
            tp[k] += np.sum(p & t); fp[k] += np.sum(p & ~t); fn[k] += np.sum(~p & t)
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    best = candidates[int(np.argmax(f1))]
    print("ELA threshold (best pooled F1 on %s): %.2f (F1 %.4f there)" % (sys.argv[1], best, f1.max()))
    scores, labels, preds, targets = [], [], [], []
    for path, mask in valid:
        size, e = ela_map(path)
        p = e > best
        preds.append(p); targets.append(target(size, mask)); labels.append(mask is not None)
        scores.append(float(p.mean()))
    m = metrics(scores, labels, preds, targets)
    print("ELA (q%d, %dx%d window):  auc %.4f  f1 %.4f  iou %.4f  overall %.4f" % (QUALITY, WINDOW, WINDOW, m["auc"], m["f1"],
                                                                              m["iou"], m["overall"]))
    m = metrics([1.0] * len(valid), labels, [np.ones_like(t) for t in targets], targets)
    print("all forged:             auc %.4f  f1 %.4f  iou %.4f  overall %.4f" % (m["auc"], m["f1"], m["iou"], m["overall"]))


if __name__ == "__main__":
    main()
