#!/usr/bin/python3
"""Unit test of tools/make_demo_data.py on two small synthetic photos and a synthetic cut-out (no network, no
Debian package): the bundle readers, the credits parsers, exact masks for every forgery procedure and shape, and
that authentic samples differ from their photo only by the shared final processing.

    /usr/bin/python3 tools/test_make_demo_data.py      (or: make test-demo-data)
"""
import io, os, struct, sys, traceback, zlib

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_demo_data as mdd  # noqa: E402

RESULTS = [0, 0]


def check(name, cond, detail=''):
    RESULTS[0 if cond else 1] += 1
    if not cond:
        print('FAIL %s %s' % (name, detail))


def photos():
    """Photo A: a gradient with strong grain, values 0..110 (no two shifted copies agree); photo B: another
    pattern, values 150..255 (every spliced pixel differs from A); a cut-out with a soft elliptic alpha,
    colours 150..255."""
    r = np.random.default_rng(7)
    y, x = np.mgrid[0:240, 0:320]
    a = np.stack([x * 60 / 320, y * 60 / 240, (x + y) * 30 / 560], -1) + r.uniform(0, 50, (240, 320, 3))
    b = 150 + 105 * (0.5 + 0.5 * np.sin(np.stack([x / 7.0, y / 11.0, (x - y) / 5.0], -1)[:200, :300]))
    b = b + r.uniform(-10, 0, b.shape)
    cut = np.zeros((90, 120, 4), np.float64)
    cut[..., :3] = r.uniform(150, 255, (90, 120, 3))
    yy, xx = np.mgrid[0:90, 0:120]
    d = ((yy - 45) / 40.0) ** 2 + ((xx - 60) / 55.0) ** 2
    cut[..., 3] = np.clip((1.0 - d) * 8, 0, 1) * 255
    u8 = lambda v: np.clip(np.rint(v), 0, 255).astype(np.uint8)
    return u8(a), u8(b), u8(cut)


def decode(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))


NATIVE = dict(work=(150, 200), out=(150, 200), crop_filter='bilinear', pre_jpeg=0)


def native_crop(cp):
    """Crop parameters that take the photo's pixels as they are (no resize, no earlier JPEG)."""
    cy, cx = cp['crop'][:2]
    cy, cx = min(cy, 240 - 150), min(cx, 320 - 200)
    return dict(NATIVE, crop=(cy, cx, 150, 200))


def sample(seed, forged, photo, ctx, native=True, **kw):
    """make_sample with the crop forced to the photo's own pixels and a PNG output without rescale."""
    rng = np.random.default_rng(seed)
    # draw once to get a crop position, then force the native geometry
    cp = native_crop(mdd.crop_params(np.random.default_rng(seed + 1000), photo['img'].shape[:2], 150))
    if native:
        kw = dict(kw, final_override=dict(fmt='png', quality=0), cp_override=cp)
    return mdd.make_sample(rng, [photo], ctx, 150, forged, **kw)


def test_masks(A, B, cut):
    photo = dict(img=A, path='A')
    ctx = dict(cutouts=[dict(img=cut, path='cut')], donors=[dict(img=B, path='B')])
    kinds = {'splice': mdd.SHAPES + ['cutout'], 'copymove': mdd.SHAPES, 'removal': mdd.SHAPES}
    for strict in (True, False):
        saved, saved_c = mdd.postprocess, mdd.composite
        if strict:          # the pasted content's own processing and seamless blending off: every masked pixel
            mdd.postprocess = lambda rng, p, strength, host_ref=None: (p, [])        # must then differ
            mdd.composite = lambda img, y, x, a, c, seamless=False: saved_c(img, y, x, a, c, False)
        try:
            for proc, ks in kinds.items():
                for kind in ks:
                    for seed in range(6):
                        s = sample(seed * 31 + len(kind), True, photo, ctx, force=proc, force_kind=kind)
                        name = '%s/%s/%s seed %d (%s)' % (proc, kind, 'strict' if strict else 'post', seed, s['desc'])
                        cy, cx, ch, cw = s['cp']['crop']
                        orig = A[cy:cy + ch, cx:cx + cw]
                        out = decode(s['data'])
                        m = s['mask']
                        check(name + ' mask binary', set(np.unique(m)) <= {0, 255})
                        check(name + ' mask size', m.shape == out.shape[:2] == orig.shape[:2])
                        mask = m > 0
                        changed = (out != orig).any(-1)
                        check(name + ' nothing outside the mask changed', not (changed & ~mask).any(),
                              '%d pixels' % (changed & ~mask).sum())
                        check(name + ' area 0.5-50 %', 0.005 <= mask.mean() <= 0.5, '%.4f' % mask.mean())
                        miss = (mask & ~changed).sum()
                        if strict and proc == 'splice':
                            check(name + ' every masked pixel pasted', miss == 0,
                                  '%d of %d unchanged' % (miss, mask.sum()))
                        else:
                            # a synthesised value may equal the original by chance (or a feathered edge round back)
                            check(name + ' masked pixels changed', miss <= 0.03 * mask.sum() + 2,
                                  '%d of %d unchanged' % (miss, mask.sum()))
        finally:
            mdd.postprocess, mdd.composite = saved, saved_c


def test_authentic(A, B, cut):
    photo = dict(img=A, path='A')
    ctx = dict(cutouts=[dict(img=cut, path='cut')], donors=[dict(img=B, path='B')])
    for seed in range(10):
        s = sample(seed, False, photo, ctx)
        cy, cx, ch, cw = s['cp']['crop']
        check('authentic %d: no mask' % seed, s['mask'] is None and s['desc'] == 'authentic')
        check('authentic %d: pixels untouched' % seed, np.array_equal(decode(s['data']), A[cy:cy + ch, cx:cx + cw]))
    # with the random shared processing (crop, rescales, earlier JPEG, final JPEG/PNG): exactly that processing
    for seed in range(30):
        s = mdd.make_sample(np.random.default_rng(seed), [photo], ctx, 96, False)
        again, ext, m = mdd.apply_final(mdd.work_image(A, s['cp']), None, s['cp']['out'], s['fp'])
        check('authentic %d: only the shared processing' % seed,
              again == s['data'] and ext == s['ext'] and m is None and np.array_equal(s['forged_work'], s['work']))
        im = Image.open(io.BytesIO(s['data']))
        check('authentic %d: output size' % seed, (im.size[1], im.size[0]) == s['cp']['out'])


def test_final_geometry(A, B, cut):
    """After a final rescale the mask is the working mask resized with the same geometry, nearest neighbour."""
    photo = dict(img=A, path='A')
    ctx = dict(cutouts=[dict(img=cut, path='cut')], donors=[dict(img=B, path='B')])
    rescaled = 0
    for seed in range(30):
        s = mdd.make_sample(np.random.default_rng(100 + seed), [photo], ctx, 96, True)
        oh, ow = s['cp']['out']
        want = np.asarray(Image.fromarray(s['work_mask'].astype(np.uint8) * 255).resize((ow, oh), Image.NEAREST))
        check('geometry %d: mask follows the image' % seed, np.array_equal(s['mask'], want))
        im = Image.open(io.BytesIO(s['data']))
        check('geometry %d: sizes' % seed, im.size == (ow, oh) == (s['mask'].shape[1], s['mask'].shape[0]))
        # the forged image went through the same final step as an authentic one would
        again = mdd.apply_final(s['forged_work'], s['work_mask'], s['cp']['out'], s['fp'])
        check('geometry %d: same final processing' % seed,
              again[0] == s['data'] and np.array_equal(again[2], s['mask']))
        rescaled += s['work_mask'].shape != (oh, ow)
    check('geometry: some samples rescaled', rescaled >= 5, str(rescaled))


def test_seamless(A, B, cut):
    """Seamless blending changes nothing outside the alpha and takes away the edge between content and host."""
    yy, xx = np.mgrid[0:60, 0:80]
    alpha = ((((yy - 30) / 26.0) ** 2 + ((xx - 40) / 36.0) ** 2) < 1).astype(np.float32)
    inner = (alpha > 0) & ~((((yy - 30) / 24.0) ** 2 + ((xx - 40) / 34.0) ** 2) < 1)
    edge = {}
    for sl in (False, True):
        img = A.astype(np.float32)
        host = img.copy()
        sup = mdd.composite(img, 50, 60, alpha, B[:60, :80].astype(np.float32), sl)
        region = host[50:110, 60:140]
        check('seamless=%s: support is the alpha' % sl,
              np.array_equal(sup[50:110, 60:140], alpha > 0) and sup.sum() == (alpha > 0).sum())
        check('seamless=%s: nothing outside changed' % sl, np.array_equal(img[~sup], host[~sup]))
        edge[sl] = float(np.abs(img[50:110, 60:140][inner] - region[inner]).mean())
    check('seamless: the edge fades', edge[True] < 0.3 * edge[False], str(edge))


def test_determinism(A, B, cut):
    photo = dict(img=A, path='A')
    ctx = dict(cutouts=[dict(img=cut, path='cut')], donors=[dict(img=B, path='B')])
    for seed in range(5):
        s1 = mdd.make_sample(np.random.default_rng([1, 0, seed]), [photo], ctx, 96, seed % 2 == 0)
        s2 = mdd.make_sample(np.random.default_rng([1, 0, seed]), [photo], ctx, 96, seed % 2 == 0)
        check('determinism %d' % seed, s1['data'] == s2['data'] and s1['desc'] == s2['desc'])


def make_rcc(files, version):
    """A Qt resource bundle as rcc writes it: files {'/dir/name': (bytes, compress)}."""
    tree = {}
    for path in files:
        parts = path.strip('/').split('/')
        t = tree
        for p in parts[:-1]:
            t = t.setdefault(p, {})
        t[parts[-1]] = path
    names, name_off = b'', {}

    def name(n):
        nonlocal names
        if n not in name_off:
            name_off[n] = len(names)
            names += struct.pack('>HI', len(n), 0) + n.encode('utf-16-be')
        return name_off[n]
    # breadth-first numbering of nodes, children of a directory contiguous
    order = [(None, tree)]
    i = 0
    entries = []
    while i < len(order):
        nm, t = order[i]
        if isinstance(t, dict):
            first = len(order)
            for k in sorted(t):
                order.append((k, t[k]))
            entries.append(('dir', nm, len(t), first))
        else:
            entries.append(('file', nm, t))
        i += 1
    data, tree_b = b'', b''
    for e in entries:
        if e[0] == 'dir':
            tree_b += struct.pack('>IHII', name(e[1]) if e[1] else 0, 2, e[2], e[3])
        else:
            blob, comp = files[e[2]]
            stored = struct.pack('>I', len(blob)) + zlib.compress(blob) if comp else blob
            tree_b += struct.pack('>IHHHI', name(e[1]), 1 if comp else 0, 0, 0, len(data))
            data += struct.pack('>I', len(stored)) + stored
        if version > 1:
            tree_b += b'\0' * 8
    head = 20 + (4 if version >= 3 else 0)
    t_off, d_off = head, head + len(tree_b)
    n_off = d_off + len(data)
    hdr = b'qres' + struct.pack('>IIII', version, t_off, d_off, n_off) + (b'\0\0\0\0' if version >= 3 else b'')
    return hdr + tree_b + data + names


def test_readers(A):
    b = io.BytesIO()
    Image.fromarray(A).save(b, 'WEBP', quality=80)
    webp = b.getvalue()
    readme = b'Copyright: Jane Doe\nSource: https://example.org/a\nLicense: CC-BY-SA-4.0\nFiles: a.webp\n\n' \
             b'Copyright: John Roe\nLicense: CC0-1.0\nFiles:\nb.webp\nc.webp\n'
    for v in (1, 2, 3):
        rcc = make_rcc({'/g/act/resource/a.webp': (webp, False), '/g/act/resource/README': (readme, True),
                        '/g/act/x.qml': (b'x' * 100, True)}, v)
        got = mdd.rcc_read(rcc)
        check('rcc v%d files' % v, sorted(got) == ['/g/act/resource/README', '/g/act/resource/a.webp', '/g/act/x.qml'],
              str(sorted(got)))
        check('rcc v%d contents' % v, got.get('/g/act/resource/a.webp') == webp
              and got.get('/g/act/x.qml') == b'x' * 100 and got.get('/g/act/resource/README') == readme)
    im = np.asarray(Image.open(io.BytesIO(webp)).convert('RGB'))
    check('webp decodes', im.shape == A.shape)
    cr = mdd.gcompris_readme_credits(readme.decode())
    check('README credits', cr.get('a.webp') == ('Jane Doe', 'CC-BY-SA-4.0', 'https://example.org/a')
          and cr.get('c.webp') == ('John Roe', 'CC0-1.0', ''), str(cr))
    # Eet: a small JPEG entry, a larger one, a zlib-compressed text entry, a lossless-encoded image entry
    b = io.BytesIO()
    Image.fromarray(A).save(b, 'JPEG', quality=90)
    big = b.getvalue()
    b = io.BytesIO()
    Image.fromarray(A[:16, :16]).save(b, 'JPEG', quality=90)
    small = b.getvalue()
    ents = [('edje/images/1', small, 0), ('edje/images/0', big, 0), ('edje/file', zlib.compress(b'hello'), 1),
            ('edje/images/2', struct.pack('>I', 0xac1dfeed) + b'\0' * 4000000, 0)]
    hdr_len = 12 + 24 * len(ents)
    names = b''.join(n.encode() + b'\0' for n, _, _ in ents)
    off, noff, dirs, body = hdr_len + len(names), hdr_len, b'', b''
    for n, blob, fl in ents:
        dirs += struct.pack('>6I', off + len(body), len(blob), 5 if fl else len(blob), noff, len(n) + 1, fl)
        noff += len(n) + 1
        body += blob
    eet = struct.pack('>III', 0x1ee70f42, len(ents), 0) + dirs + names + body
    got = {n: bl for n, bl, _ in mdd.eet_read(eet)}
    check('eet entries', got.get('edje/file') == b'hello' and got.get('edje/images/0') == big)
    check('edj photo is the largest plain JPEG', mdd.edj_photo(eet) == big)


def test_dep5():
    import tempfile
    text = ('Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n'
            'Files: *\nCopyright: 2010-2012 Razor team\n           2012-2022 LXQt team\nLicense: LGPL-2.1+\n\n'
            'Files: nature/Aqua.jpg\n       nature/Garden.jpg\nCopyright: 2008, Charles Barbin <x@y.fr>\n'
            'License: GPL-2+\n\nFiles: debian/*\nCopyright: 2014 Someone\nLicense: GPL-2+\n\n'
            'License: GPL-2+\n text\n')
    with tempfile.NamedTemporaryFile('w', suffix='copyright', delete=False) as f:
        f.write(text)
    st = mdd.dep5(f.name)
    os.unlink(f.name)
    m = mdd.dep5_match(st, '/usr/share/backgrounds/mate/nature/Garden.jpg')
    check('dep5 specific stanza', m and mdd.clean_copyright(m[0]) == 'Charles Barbin' and m[1] == 'GPL-2+', str(m))
    m = mdd.dep5_match(st, '/usr/share/lxqt/wallpapers/fog.jpg')
    check('dep5 catch-all', m and mdd.clean_copyright(m[0]) == 'Razor team; LXQt team' and m[1] == 'LGPL-2.1+', str(m))


def test_pronounced(A, B, cut):
    """--pronounced: the trace lands only on masked pixels, and each of its five kinds occurs."""
    photo = dict(img=A, path='A')
    ctx = dict(cutouts=[dict(img=cut, path='cut')], donors=[dict(img=B, path='B')])
    kinds = set()
    for seed in range(40):
        plain = sample(seed, True, photo, ctx)
        s = sample(seed, True, photo, ctx, pronounced=True)
        cy, cx, ch, cw = s['cp']['crop']
        out, mask = decode(s['data']), s['mask'] > 0
        op = s['desc'].split(';')[-1]
        kinds.add(op.split('-')[1].rstrip('0123456789.'))
        name = 'pronounced seed %d (%s)' % (seed, s['desc'])
        check(name + ' named', op.startswith('strong-'))
        check(name + ' same forgery as without', s['desc'].startswith(plain['desc']) and np.array_equal(s['mask'], plain['mask']))
        check(name + ' nothing outside the mask changed', not ((out != A[cy:cy + ch, cx:cx + cw]).any(-1) & ~mask).any())
        check(name + ' the trace changed masked pixels', (out != decode(plain['data'])).any(-1)[mask].mean() > 0.3)
    check('pronounced: every kind drawn', kinds == {'noise', 'blur', 'jpeg', 'resample', 'sharpen'}, str(kinds))


def test_area(A, B, cut):
    """--area MIN MAX: the forged share follows the range (the default draws are those of (0.01, 0.40))."""
    photo = dict(img=A, path='A')
    ctx = dict(cutouts=[dict(img=cut, path='cut')], donors=[dict(img=B, path='B')])
    same = all(np.array_equal(sample(seed, True, photo, ctx)['mask'],
                              sample(seed, True, photo, dict(ctx, area=(0.01, 0.40)))['mask']) for seed in range(5))
    check('area: the default is (0.01, 0.40)', same and mdd.AREA == (0.01, 0.40))
    small = [sample(seed, True, photo, dict(ctx, area=(0.01, 0.03)))['frac'] for seed in range(20)]
    large = [sample(seed, True, photo, dict(ctx, area=(0.2, 0.4)))['frac'] for seed in range(20)]
    check('area: (0.01, 0.03) gives small forgeries', np.median(small) < 0.05, str(np.round(small, 3)))
    check('area: (0.2, 0.4) gives large forgeries', 0.15 < np.median(large) < 0.5, str(np.round(large, 3)))


def test_plain(A, B, cut):
    """--plain: no final rescale and PNG, for forged and authentic samples alike."""
    photo = dict(img=np.concatenate([A, A[::-1]], 0), path='A')   # tall enough for a working size above the output
    ctx = dict(cutouts=[dict(img=cut, path='cut')], donors=[dict(img=B, path='B')], plain=True)
    for seed in range(12):
        s = sample(seed, seed % 2 == 0, photo, ctx, native=False)
        name = 'plain seed %d' % seed
        check(name + ': PNG', s['ext'] == '.png' and s['fp']['fmt'] == 'png')
        check(name + ': no final rescale', s['cp']['work'] == s['cp']['out'] and
              decode(s['data']).shape[:2] == s['cp']['out'], str(s['cp']))
        check(name + ': the output is the forged working image', np.array_equal(decode(s['data']), s['forged_work']))


def main():
    A, B, cut = photos()
    for t in (test_readers, test_dep5, test_authentic, test_final_geometry, test_seamless, test_determinism,
              test_masks, test_pronounced, test_area, test_plain):
        try:
            t(A, B, cut) if t not in (test_readers, test_dep5) else (t(A) if t is test_readers else t())
        except Exception:
            traceback.print_exc()
            check(t.__name__ + ' raised', False)
    print('test_make_demo_data: %d passed, %d failed' % tuple(RESULTS))
    return 1 if RESULTS[1] else 0


if __name__ == '__main__':
    sys.exit(main())
