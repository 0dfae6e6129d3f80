#!/usr/bin/python3
"""A diagnostic data set for from-scratch training (weights/README.md, "Fourth round"): S x S crops of the
authentic images of a make_demo_data split, every second one with a rectangle of Gaussian noise.

    /usr/bin/python3 tools/noise_probe.py SPLIT_DIR OUT_DIR COUNT SEED [--sigma 20] [--size 224] [--jpeg Q]
                                          [--side 60 150] [--floor F] [--kind noise|blur] [--radius 2]

SPLIT_DIR is e.g. build/demo-data/train (its images without a mask are used); OUT_DIR gets images/ and
masks/ in the layout loupe train reads. Odd samples get a rectangle of noise of the given sigma whose
sides are drawn from --side's range (60-150 px by default, at most the crop); the mask marks exactly the
rectangle. With --kind blur the rectangle is blurred instead (a Gaussian of the given --radius). With
--floor F every image first gets noise of a sigma drawn from 0 to F over all its pixels, so that only the
rectangle's difference from the rest of its image tells, not the noise level itself. Images are PNG, or
JPEG at quality Q with --jpeg. A build-time tool (Debian's python3-pil and python3-numpy), never needed by
loupe.c or its tests."""
import argparse, os, random

import numpy as np
from PIL import Image, ImageFilter


def to_image(px):
    """float pixels (HxWx3) -> an RGB image, rounded and clipped to 0..255"""
    return Image.fromarray(np.clip(px + 0.5, 0, 255).astype(np.uint8))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('split'), ap.add_argument('out'), ap.add_argument('count', type=int), ap.add_argument('seed', type=int)
    ap.add_argument('--sigma', type=float, default=20.0)
    ap.add_argument('--size', type=int, default=224)
    ap.add_argument('--jpeg', type=int, default=0)
    ap.add_argument('--side', type=int, nargs=2, default=[60, 150], metavar=('MIN', 'MAX'))
    ap.add_argument('--floor', type=float, default=0.0)
    ap.add_argument('--kind', choices=['noise', 'blur'], default='noise')
    ap.add_argument('--radius', type=float, default=2.0)
    a = ap.parse_args()
    if not 1 <= a.side[0] <= a.side[1]:
        ap.error('--side needs 1 <= MIN <= MAX (got %d %d)' % tuple(a.side))
    if a.count < 0 or a.size < 1:
        ap.error('COUNT must be at least 0 and --size at least 1 (got %d, %d)' % (a.count, a.size))
    if not a.floor >= 0:
        ap.error('--floor must be at least 0 (got %g)' % a.floor)
    if not a.radius > 0:
        ap.error('--radius must be above 0 (got %g)' % a.radius)
    if not 0 <= a.jpeg <= 100:
        ap.error('--jpeg must be a quality from 1 to 100, or 0 for PNG (got %d)' % a.jpeg)
    rng, nr = random.Random(a.seed), np.random.default_rng(a.seed)
    masks = set(os.path.splitext(f)[0] for f in os.listdir(os.path.join(a.split, 'masks')))
    auth = [f for f in sorted(os.listdir(os.path.join(a.split, 'images'))) if os.path.splitext(f)[0] not in masks]
    if not auth:
        ap.error('%s has no authentic images' % a.split)
    for d in ('images', 'masks'):
        os.makedirs(os.path.join(a.out, d), exist_ok=True)
    s = a.size
    for i in range(a.count):
        im = Image.open(os.path.join(a.split, 'images', auth[i % len(auth)])).convert('RGB')
        if min(im.size) < s:
            ap.error('%s is smaller than %d px' % (auth[i % len(auth)], s))
        x, y = rng.randint(0, im.size[0] - s), rng.randint(0, im.size[1] - s)
        px = np.asarray(im.crop((x, y, x + s, y + s))).astype(np.float32)
        name = 'n%05d' % i
        if a.floor > 0:
            px = px + nr.normal(0, rng.uniform(0, a.floor), px.shape)
        if i % 2:
            lo, hi = min(a.side[0], s), min(a.side[1], s)
            rw, rh = rng.randint(lo, hi), rng.randint(lo, hi)
            x0, y0 = rng.randint(0, s - rw), rng.randint(0, s - rh)
            mk = np.zeros((s, s), bool)
            mk[y0:y0 + rh, x0:x0 + rw] = True
            if a.kind == 'noise':
                alt = px + nr.normal(0, a.sigma, px.shape)
            else:
                blurred = to_image(px).filter(ImageFilter.GaussianBlur(a.radius))
                alt = np.asarray(blurred).astype(np.float32)
            px = np.where(mk[..., None], alt, px)
            Image.fromarray(mk.astype(np.uint8) * 255).save(os.path.join(a.out, 'masks', name + '.png'))
        out = to_image(px)
        if a.jpeg:
            out.save(os.path.join(a.out, 'images', name + '.jpg'), quality=a.jpeg)
        else:
            out.save(os.path.join(a.out, 'images', name + '.png'))


if __name__ == '__main__':
    main()
