#!/usr/bin/python3
"""How far low-level statistics could separate a labelled set's forged images from its authentic ones, if the
forged region were known (an upper bound for detectors built on such statistics, not a detector).

    tools/oracle_separability.py DATA_DIR [--size N] [--seed S]

Build-time diagnostic (Debian's python3-pil and python3-numpy); loupe itself never needs it.

For each image of DATA_DIR (images/ and masks/, as `loupe train` reads them) a region is taken: a forged image's own
mask; for an authentic image, the mask of a forged image drawn at random (seeded), stretched to the image's size, so
that both classes are measured over regions of the same shapes and sizes. With --size N the image and region are first
resized to N x N (bicubic; nearest for the region), as the model's input is; without it, native size. Inside is the
region shrunk by 2 pixels, outside the complement of the region grown by 2 pixels, so that the seam itself counts only
in the seam statistic.

Statistics (each image's score is how much inside and outside differ):
  laplace  |log| ratio of the mean absolute 4-neighbour Laplacian of the gray image (noise and fine detail)
  median   |log| ratio of the mean absolute residual from a 3 x 3 median filter (noise)
  gradient |log| ratio of the median gradient magnitude (sharpness, blur)
  ela      |log| ratio of the mean error after a JPEG round trip at quality 90 (compression history)
  sat      difference of the mean HSV saturation (colour)
  bright   difference of the mean gray level (brightness)
  seam     log ratio of the mean gradient magnitude on the region's 1-pixel-wide border to that outside (a visible edge
           along the region's outline)
Each statistic's AUC (forged against authentic), then the AUC of a logistic regression over all seven, scored by
5-fold cross-validation (each image scored by a model fitted without it).
"""
import argparse
import io
import os
import random
import sys

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_baselines import auc, dataset, target  # noqa: E402

NAMES = ("laplace", "median", "gradient", "ela", "sat", "bright", "seam")


def morph(region, size, grow):
    """The region grown (MaxFilter) or shrunk (MinFilter) with a size x size square."""
    img = Image.fromarray(region.astype(np.uint8) * 255)
    img = img.filter(ImageFilter.MaxFilter(size) if grow else ImageFilter.MinFilter(size))
    return np.asarray(img) > 127


def statistics(img, region):
    """The seven scores of one image (a PIL RGB image) for one region (bool H x W), or None if the region or its
    complement is too small to measure."""
    inside, outside = morph(region, 5, False), ~morph(region, 5, True)
    border = morph(region, 3, True) & ~morph(region, 3, False)
    if inside.sum() < 16 or outside.sum() < 16:
        return None
    rgb = np.asarray(img, np.float32)
    gray = rgb.mean(axis=2)
    lap = np.zeros_like(gray)
    lap[1:-1, 1:-1] = np.abs(4 * gray[1:-1, 1:-1] - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2] - gray[1:-1, 2:])
    med = np.abs(gray - np.asarray(Image.fromarray(gray.astype(np.uint8)).filter(ImageFilter.MedianFilter(3)), np.float32))
    gy, gx = np.gradient(gray)
    grad = np.hypot(gx, gy)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    ela = np.abs(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), np.float32) - rgb).mean(axis=2)
    sat = np.asarray(img.convert("HSV"), np.float32)[..., 1]

    def ratio(x, f=np.mean):
        return abs(np.log((f(x[inside]) + 1e-2) / (f(x[outside]) + 1e-2)))

    return (ratio(lap), ratio(med), ratio(grad, np.median), ratio(ela),
            abs(sat[inside].mean() - sat[outside].mean()) / 255, abs(gray[inside].mean() - gray[outside].mean()) / 255,
            float(np.log((grad[border].mean() + 1) / (grad[outside].mean() + 1))))


def cross_validated_logistic(x, y, folds=5, steps=3000, rate=0.1, l2=1e-3):
    """Each row's score from a logistic regression (standardised features, gradient descent) fitted on the other
    folds."""
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-9)
    order = np.random.RandomState(0).permutation(len(y))
    out = np.zeros(len(y))
    for f in range(folds):
        test = order[f::folds]
        fit = np.setdiff1d(order, test)
        w, b = np.zeros(x.shape[1]), 0.0
        for _ in range(steps):
            g = 1 / (1 + np.exp(-(x[fit] @ w + b))) - y[fit]
            w -= rate * (x[fit].T @ g / len(fit) + l2 * w)
            b -= rate * g.mean()
        out[test] = x[test] @ w + b
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data")
    ap.add_argument("--size", type=int, default=0, help="resize to N x N first (0: native size)")
    ap.add_argument("--seed", type=int, default=1, help="which forged masks the authentic images borrow")
    a = ap.parse_args()
    if not os.path.isdir(os.path.join(a.data, "images")):
        sys.exit("oracle_separability: %s: no images/ folder (expected DATA/images and DATA/masks)" % a.data)
    items = dataset(a.data)
    masks = [m for _, m in items if m is not None]
    if not masks or len(masks) == len(items):
        sys.exit("oracle_separability: %s: needs both forged images (with masks) and authentic ones" % a.data)
    rng = random.Random(a.seed)
    rows, labels = [], []
    for path, mask in items:
        img = Image.open(path).convert("RGB")
        forged = mask is not None
        if forged:
            region = target(img.size, mask)
        else:
            borrowed = Image.open(rng.choice(masks)).convert("L").resize(img.size, Image.NEAREST)
            region = np.asarray(borrowed) > 127
        if a.size:
            img = img.resize((a.size, a.size), Image.BICUBIC)
            region = np.asarray(Image.fromarray(region.astype(np.uint8) * 255).resize((a.size, a.size), Image.NEAREST)) > 127
        s = statistics(img, region)
        if s is not None:
            rows.append(s)
            labels.append(forged)
    x, y = np.array(rows), np.array(labels, float)
    print("%s at %s: %d forged, %d authentic images measured" % (a.data, "%d x %d" % (a.size, a.size) if a.size
                                                                  else "native size", int(y.sum()), int(len(y) - y.sum())))
    for k, name in enumerate(NAMES):
        print("  %-9s AUC %.3f" % (name, auc(list(x[:, k]), list(y))))
    print("  all seven (logistic regression, 5-fold cross-validated) AUC %.3f" % auc(list(cross_validated_logistic(x, y)),
                                                                                     list(y)))


if __name__ == "__main__":
    main()
