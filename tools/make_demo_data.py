#!/usr/bin/python3
"""Builds the demo model's training data: forgeries made from freely licensed photographs in Debian packages.

    /usr/bin/python3 tools/make_demo_data.py [--build build] [--seed 1] [--train 2000] [--valid 300] [--size 256]

Steps (each skipped when its output is already there):
  1. `apt-get download` the packages of tools/demo-photos.tsv and tools/demo-cutouts.txt into BUILD/demo-debs/;
  2. `dpkg-deb -x` each into BUILD/demo-root/PACKAGE/ (nothing is installed);
  3. read the photos: plain JPEG/PNG files, WebP files inside Qt resource bundles (.rcc, read here), the JPEG inside
     Enlightenment's Eet archives (.edj, read here), and each photo's author and licence from the package (DEP-5
     debian/copyright, the READMEs inside the GCompris bundles, KDE's metadata.json, LXQt's wallpapers/License);
  4. split the photos (whole photos, never crops) and the cut-outs into train and valid, make roughly half of the
     samples forged (splicing, copy-move, removal; see forge()) and put every sample, forged or not, through the same
     final processing (see final_params()/apply_final());
  5. write BUILD/demo-data/{train,valid}/{images,masks}/ (a mask has its image's stem, 8-bit gray PNG, 255 forged,
     0 real; authentic images have no mask), BUILD/demo-data/sources.tsv (every photo and cut-out used, with
     package, path, split, author and licence), BUILD/demo-data/meta-{train,valid}.tsv (how each sample was made)
     and BUILD/demo-data/DATA-CREDITS.md.

Needs Debian's python3-pil and python3-numpy; this is a build-time data tool only: loupe.c and its tests never
need it.
"""
import argparse, fnmatch, glob, hashlib, io, json, math, multiprocessing, os, re
import struct, subprocess, sys, time, zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTO_LIST = os.path.join(HERE, 'demo-photos.tsv')
CUTOUT_LIST = os.path.join(HERE, 'demo-cutouts.txt')
CUTOUT_PACKAGE = 'tuxpaint-stamps-default'
CACHE_SHORT = 896            # photos are kept in memory with at most this short side

# ----------------------------------------------------------------------------------------------------------------
# Qt resource bundles (.rcc)


def rcc_read(data):
    """Returns {path: bytes} for every file of a Qt resource bundle (format versions 1-3).

    Header: 'qres', u32 version, u32 tree offset, u32 data offset, u32 names offset (+ u32 flags in version 3),
    all big-endian. Tree nodes are 14 bytes (22 from version 2 on: + u64 modification time): u32 name offset,
    u16 flags (1 zlib, 2 directory, 4 zstd), then a directory's u32 child count and u32 first child index, or a
    file's u16 country, u16 language and u32 data offset. A name is u16 length, u32 hash, UTF-16BE characters;
    a file's data is u32 length then the bytes, and zlib-compressed files start with the u32 uncompressed size."""
    if data[:4] != b'qres':
        raise ValueError('not a Qt resource bundle')
    version, tree, dat, names = struct.unpack_from('>IIII', data, 4)
    if version not in (1, 2, 3):
        raise ValueError('Qt resource format version %d' % version)
    node = 14 if version == 1 else 22
    out = {}

    def name(off):
        n, = struct.unpack_from('>H', data, names + off)
        return data[names + off + 6: names + off + 6 + 2 * n].decode('utf-16-be')

    def walk(i, prefix, depth):
        if depth > 64:
            raise ValueError('Qt resource tree too deep')
        p = tree + i * node
        noff, flags = struct.unpack_from('>IH', data, p)
        full = prefix + (name(noff) if i else '')
        if flags & 2:
            count, first = struct.unpack_from('>II', data, p + 6)
            for c in range(count):
                walk(first + c, full + '/', depth + 1)
            return
        doff, = struct.unpack_from('>I', data, p + 10)
        n, = struct.unpack_from('>I', data, dat + doff)
        blob = data[dat + doff + 4: dat + doff + 4 + n]
        if flags & 4:
            blob = None                       # zstd: not in Python's standard library; reported by the caller
        elif flags & 1:
            blob = zlib.decompress(blob[4:])
        out[full] = blob

    walk(0, '', 0)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Enlightenment Eet archives (.edj)


def eet_read(data):
    """Returns [(name, bytes or None, flags)] for the entries of an Eet archive (format 2, magic 0x1ee70f42).

    Header: u32 magic, u32 directory entries, u32 dictionary entries; then per entry u32 offset, u32 stored size,
    u32 data size, u32 name offset, u32 name size, u32 flags (bit 0 compressed, bit 1 ciphered, bit 2 alias,
    bits 3.. the compression type: 0 zlib), all big-endian. Compressed entries other than zlib and ciphered ones
    come back as None (not decoded here)."""
    magic, ndir, _ndict = struct.unpack_from('>III', data, 0)
    if magic != 0x1ee70f42:
        raise ValueError('not an Eet archive')
    out = []
    for i in range(ndir):
        off, size, dsize, noff, nsize, flags = struct.unpack_from('>6I', data, 12 + 24 * i)
        name = data[noff:noff + nsize].rstrip(b'\0').decode('utf-8', 'replace')
        blob = data[off:off + size]
        if flags & 2:
            blob = None
        elif flags & 1:
            blob = zlib.decompress(blob) if (flags >> 3) & 0xf == 0 else None
        out.append((name, blob, flags))
    return out


def edj_photo(data):
    """The photo of an Enlightenment background theme: its largest image entry stored as a plain JPEG.
    Edje image entries are either JPEG files as they were (lossy) or Eet's own image encoding (lossless
    ARGB, 0xac1dfeed; JPEG + alpha, 0xbeeff00d); only plain JPEGs are taken, never guessed at."""
    best = None
    for name, blob, _flags in eet_read(data):
        if name.startswith('edje/images/') and blob is not None and blob[:3] == b'\xff\xd8\xff':
            if best is None or len(blob) > len(best):
                best = blob
    return best


# ----------------------------------------------------------------------------------------------------------------
# Authors and licences from the packages


def dep5(path):
    """Parses a machine-readable debian/copyright file into [(file globs, copyright, licence)]."""
    stanzas, cur, key = [], {}, None
    for line in open(path, encoding='utf-8', errors='replace').read().split('\n') + ['']:
        if not line.strip():
            if cur:
                stanzas.append(cur)
            cur, key = {}, None
            continue
        if line[0] in ' \t':
            if key:
                cur[key] += '\n' + line.strip()
            continue
        k, _, v = line.partition(':')
        key = k.strip().lower()
        cur[key] = v.strip()
    out = []
    for s in stanzas:
        if 'files' in s:
            globs = s['files'].split()
            lic = s.get('license', '').split('\n')[0].strip()
            out.append((globs, s.get('copyright', ''), lic))
    return out


def dep5_match(stanzas, path):
    """The last stanza whose glob matches the installed path's tail (upstream paths are relative to the source
    tree, installed ones sit under /usr/share/...); '*' matches everything."""
    parts = path.strip('/').split('/')
    found = None
    for globs, cr, lic in stanzas:
        for g in globs:
            if g == '*' or any(fnmatch.fnmatchcase('/'.join(parts[i:]), g) for i in range(len(parts))):
                if not g.startswith('debian/'):
                    found = (cr, lic)
    return found


def clean_copyright(cr):
    """'2008, Charles Barbin <x@y>' -> 'Charles Barbin' (one holder a line, years and e-mail dropped)."""
    names = []
    for line in cr.split('\n'):
        line = re.sub(r'<[^>]*>', '', line)
        line = re.sub(r'^(©|\(c\)|copyright)\s*', '', line.strip(), flags=re.I)
        line = re.sub(r'^[0-9][0-9 ,\-–.and]*[,.]?\s*', '', line).strip(' ,´\'"')
        line = re.sub(r'^by\s+', '', line)
        if line and line.lower() != 'none':
            names.append(line)
    if len(names) > 2:           # a catch-all stanza (holders, translators...): its first holder
        return names[0] + '; and others (see debian/copyright)'
    return '; '.join(names)


def gcompris_readme_credits(text):
    """{file name: (author, licence, source)} from a GCompris resource README (stanzas of Copyright:, License:,
    Source:, Files:, Comments:, the file names on the Files: line or on the lines after it)."""
    out = {}
    for block in re.split(r'\n\s*\n', text):
        fields, key = {}, None
        for line in block.split('\n'):
            m = re.match(r'^(\w+):\s*(.*)$', line)
            if m:
                key = m.group(1).lower()
                fields[key] = m.group(2).strip()
            elif key == 'files' and line.strip():
                fields['files'] += ' ' + line.strip()
        for f in fields.get('files', '').split():
            out[f] = (fields.get('copyright', ''), fields.get('license', ''), fields.get('source', ''))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Download, unpack, read


def packages_needed():
    pk = []
    for row in read_photo_list():
        if row['package'] not in pk:
            pk.append(row['package'])
    return pk + [CUTOUT_PACKAGE]


def read_photo_list():
    rows = []
    with open(PHOTO_LIST, encoding='utf-8') as f:
        head = f.readline().rstrip('\n').split('\t')
        for line in f:
            if line.strip():
                rows.append(dict(zip(head, line.rstrip('\n').split('\t'))))
    return rows


def download_and_unpack(build, log):
    debs, root = os.path.join(build, 'demo-debs'), os.path.join(build, 'demo-root')
    os.makedirs(debs, exist_ok=True)
    os.makedirs(root, exist_ok=True)
    for pkg in packages_needed():
        have = glob.glob(os.path.join(debs, pkg + '_*.deb'))
        if not have:
            log('download %s' % pkg)
            cmd = ['apt-get', 'download', pkg]
            r = subprocess.run(cmd, cwd=debs, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if r.returncode != 0:               # no package lists yet: update once and try again
                log('apt-get download failed (%s); running apt-get update' % r.stdout.strip().splitlines()[-1:])
                subprocess.run(['apt-get', 'update', '-q'], check=False)
                subprocess.run(cmd, cwd=debs, check=True)
            have = glob.glob(os.path.join(debs, pkg + '_*.deb'))
        dest = os.path.join(root, pkg)
        stamp = os.path.join(dest, '.unpacked')
        if not os.path.exists(stamp):
            log('unpack %s' % os.path.basename(have[0]))
            os.makedirs(dest, exist_ok=True)
            subprocess.run(['dpkg-deb', '-x', have[0], dest], check=True)
            open(stamp, 'w').write(os.path.basename(have[0]) + '\n')
    return root


def load_photos(root, log):
    """Reads every photo of the list: [{package, path, author, licence, source, img (HxWx3 uint8, short side at
    most CACHE_SHORT)}], and the list of packages skipped (with the reason)."""
    photos, skipped, bundles, credits = [], {}, {}, {}
    dep5_cache = {}
    for row in read_photo_list():
        pkg, path = row['package'], row['path_in_package']
        if pkg in skipped:
            continue
        proot = os.path.join(root, pkg)
        author = licence = source = ''
        try:
            if ' :' in path:                                            # file inside a Qt resource bundle
                bundle, inner = path.split(' :', 1)
                if bundle not in bundles:
                    bundles[bundle] = rcc_read(open(proot + bundle, 'rb').read())
                    for k, v in bundles[bundle].items():
                        if k.endswith('/README') and v is not None:
                            d = k.rsplit('/', 1)[0]
                            for f, c in gcompris_readme_credits(v.decode('utf-8', 'replace')).items():
                                credits[(bundle, d + '/' + f)] = c
                blob = bundles[bundle].get(inner)
                if blob is None:
                    raise ValueError('%s not in %s (or zstd-compressed)' % (inner, bundle))
                author, licence, source = credits.get((bundle, inner), ('', '', ''))
                licence += ' (README in the bundle)'
            elif path.endswith('.edj'):
                blob = edj_photo(open(proot + path, 'rb').read())
                if blob is None:
                    skipped[pkg] = 'no plain JPEG entry in %s (not decoded: Eet image encoding)' % path
                    continue
            else:
                blob = open(proot + path, 'rb').read()
            if not author:
                cfile = os.path.join(proot, 'usr/share/doc', pkg, 'copyright')
                if cfile not in dep5_cache:
                    dep5_cache[cfile] = dep5(cfile)
                m = dep5_match(dep5_cache[cfile], path)
                author, licence = (clean_copyright(m[0]), m[1] + ' (debian/copyright)') if m else ('', '')
                meta = os.path.join(proot + path.split('/contents/')[0], 'metadata.json')
                if '/contents/' in path and os.path.exists(meta):                # KDE wallpaper package
                    kp = json.load(open(meta, encoding='utf-8')).get('KPlugin', {})
                    names = [a.get('Name', '') for a in kp.get('Authors', [])]
                    if names:
                        author = ', '.join(names)
                    if kp.get('License'):
                        licence += '; %s (metadata.json)' % kp['License']
                lic_file = os.path.join(os.path.dirname(proot + path), 'License')
                if os.path.exists(lic_file):                                    # LXQt wallpapers
                    t = open(lic_file, encoding='utf-8', errors='replace').read()
                    m2 = re.search(r'creativecommons.org/licenses/([a-z-]+)/([0-9.]+)', t)
                    if m2:
                        licence = 'CC-%s-%s (wallpapers/License); %s' % (m2.group(1).upper(), m2.group(2), licence)
                    m3 = re.search(r'Copyright[^:\n]*:\s*(.+)', t)
                    stem = os.path.splitext(os.path.basename(path))[0].lower()
                    credit = [ln.split('(')[0].strip() for ln in t.split('\n\n')
                              if stem.split('-')[0] in ln.lower() and '(' in ln]
                    author = '; '.join(x for x in [m3.group(1).strip() if m3 else '', ', '.join(credit)] if x)
            im = Image.open(io.BytesIO(blob))
            im.draft('RGB', (im.size[0] // 2, im.size[1] // 2)) if min(im.size) >= 4 * CACHE_SHORT else None
            im = im.convert('RGB')
            s = CACHE_SHORT / min(im.size)
            if s < 1:
                im = im.resize((max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s))), Image.LANCZOS)
        except (OSError, ValueError, struct.error, zlib.error) as e:
            log('cannot read %s %s: %s' % (pkg, path, e))
            continue
        if not author and row.get('author'):
            author = row['author'] + ' (tools/demo-photos.tsv)'
        photos.append(dict(package=pkg, path=path, author=author,
                           licence=licence or row.get('license', ''), source=source,
                           sha=hashlib.sha256(blob).hexdigest()[:16], img=np.asarray(im)))
    return photos, skipped


def load_cutouts(root, log):
    cut = []
    proot = os.path.join(root, CUTOUT_PACKAGE)
    cfile = os.path.join(proot, 'usr/share/doc', CUTOUT_PACKAGE, 'copyright')
    m = dep5_match(dep5(cfile), 'usr/share/tuxpaint/stamps/x.png') or ('', '')
    for line in open(CUTOUT_LIST, encoding='utf-8'):
        p = line.strip()
        if not p:
            continue
        try:
            im = Image.open(os.path.join(proot, p)).convert('RGBA')
        except OSError as e:
            log('cannot read cut-out %s: %s' % (p, e))
            continue
        bbox = im.getchannel('A').point(lambda a: 255 if a > 8 else 0).getbbox()
        if bbox is None:
            continue
        im = im.crop(bbox)
        im.thumbnail((512, 512), Image.LANCZOS)
        cut.append(dict(package=CUTOUT_PACKAGE, path='/' + p, author=clean_copyright(m[0]),
                        licence=m[1] + ' (debian/copyright)', source='', img=np.asarray(im)))
    return cut


# ----------------------------------------------------------------------------------------------------------------
# Image helpers (numpy; float32 images in 0..255)

FILTERS = {'nearest': Image.NEAREST, 'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC,
           'lanczos': Image.LANCZOS, 'box': Image.BOX, 'hamming': Image.HAMMING}


def resize(a, w, h, filt):
    """Resizes an HxWxC (or HxW) uint8 array with PIL's filter."""
    return np.asarray(Image.fromarray(a).resize((w, h), FILTERS[filt]))


def box_blur(a, r):
    """Mean over a (2r+1)^2 window with edge replication, along both axes (float arrays, any trailing dims)."""
    r = int(r)
    if r <= 0:
        return a.astype(np.float32)
    out = a.astype(np.float32)
    for ax in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[ax] = (r + 1, r)
        c = np.cumsum(np.pad(out, pad, mode='edge'), axis=ax, dtype=np.float64)
        n = out.shape[ax]
        hi = np.take(c, np.arange(2 * r + 1, 2 * r + 1 + n), axis=ax)
        lo = np.take(c, np.arange(0, n), axis=ax)
        out = ((hi - lo) / (2 * r + 1)).astype(np.float32)
    return out


def gauss_blur(a, sigma):
    """Gaussian blur with edge replication: an exact separable kernel (radius 3 sigma) up to sigma 3, three box
    blurs of the same variance above."""
    a = a.astype(np.float32)
    if sigma <= 0:
        return a
    if sigma <= 3:
        r = int(math.ceil(3 * sigma))
        k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
        k = (k / k.sum()).astype(np.float32)
        for ax in (0, 1):
            pad = [(0, 0)] * a.ndim
            pad[ax] = (r, r)
            p = np.pad(a, pad, mode='edge')
            n = a.shape[ax]
            a = sum(k[i] * np.take(p, np.arange(i, i + n), axis=ax) for i in range(2 * r + 1))
        return a.astype(np.float32)
    r = max(1, int(round((math.sqrt(4 * sigma * sigma + 1) - 1) / 2)))
    for _ in range(3):
        a = box_blur(a, r)
    return a


def jpeg_roundtrip(a, q, sub=0):
    b = io.BytesIO()
    Image.fromarray(a).save(b, 'JPEG', quality=int(q), subsampling=sub)
    return np.asarray(Image.open(io.BytesIO(b.getvalue())).convert('RGB'))


def to_u8(a):
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def log_uniform(rng, lo, hi):
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


# ----------------------------------------------------------------------------------------------------------------
# Shapes: a soft alpha (float 0..1) of a given size and area


def canonical_shape(rng, kind, cutouts):
    """A shape drawn on a 512x512 canvas ('L' image, 255 inside) and a short name."""
    n = 512
    im = Image.new('L', (n, n), 0)
    d = ImageDraw.Draw(im)
    if kind == 'ellipse':
        d.ellipse([rng.uniform(0, 60), rng.uniform(0, 60), n - rng.uniform(0, 60), n - rng.uniform(0, 60)], fill=255)
        im = im.rotate(rng.uniform(0, 180), Image.BILINEAR)
    elif kind in ('polygon', 'blob'):
        k = int(rng.integers(3, 11)) if kind == 'polygon' else int(rng.integers(8, 24))
        ang = np.sort(rng.uniform(0, 2 * math.pi, k))
        rad = rng.uniform(0.35, 1.0, k) if rng.random() < 0.7 else rng.uniform(0.8, 1.0, k)
        pts = [(n / 2 + 0.48 * n * r * math.cos(t), n / 2 + 0.48 * n * r * math.sin(t)) for r, t in zip(rad, ang)]
        d.polygon(pts, fill=255)
        if kind == 'blob':
            im = im.filter(ImageFilter.GaussianBlur(rng.uniform(15, 40))).point(lambda v: 255 if v > 127 else 0)
    elif kind == 'rect':
        d.rectangle([rng.uniform(0, 40), rng.uniform(0, 40), n - rng.uniform(0, 40), n - rng.uniform(0, 40)], fill=255)
        if rng.random() < 0.4:
            im = im.rotate(rng.uniform(-25, 25), Image.BILINEAR)
    elif kind == 'stroke':
        k = int(rng.integers(2, 6))
        pts = [(rng.uniform(40, n - 40), rng.uniform(40, n - 40)) for _ in range(k)]
        w = int(rng.uniform(25, 90))
        d.line(pts, fill=255, width=w, joint='curve')
        for p in (pts[0], pts[-1]):
            d.ellipse([p[0] - w / 2, p[1] - w / 2, p[0] + w / 2, p[1] + w / 2], fill=255)
    elif kind == 'object':
        c = cutouts[int(rng.integers(len(cutouts)))]
        a = Image.fromarray(c['img'][..., 3])
        if rng.random() < 0.5:
            a = a.transpose(Image.FLIP_LEFT_RIGHT)
        a.thumbnail((n, n), Image.BILINEAR)
        im.paste(a, ((n - a.size[0]) // 2, (n - a.size[1]) // 2))
        return im.crop(im.getbbox() or (0, 0, n, n)), 'object'
    box = im.getbbox() or (0, 0, n, n)
    return im.crop(box), kind


SHAPES = ['ellipse', 'polygon', 'blob', 'rect', 'stroke', 'object']


def make_alpha(rng, canon, area, hmax, wmax, seam):
    """Scales a canonical shape to cover about `area` pixels (random aspect change), with the seam style:
    'hard' (binary), 'aa' (bilinear edge, about 1 px) or 'feather' (blurred by a few pixels). Returns a float
    alpha of the bounding box (quantised to 1/255, values below 0.04 dropped so that every masked pixel really
    takes its value from elsewhere) and the box size."""
    cw, ch = canon.size
    fill = max(np.asarray(canon).mean() / 255.0, 0.05)
    aspect = (cw / ch) * log_uniform(rng, 0.7, 1.4)
    bh = math.sqrt(area / (fill * aspect))
    bw = bh * aspect
    s = min(1.0, (hmax - 2) / bh, (wmax - 2) / bw)
    bh, bw = max(4, int(round(bh * s))), max(4, int(round(bw * s)))
    if seam == 'hard':
        a = np.asarray(canon.resize((bw, bh), Image.BILINEAR)) > 127
        a = a.astype(np.float32)
    else:
        a = np.asarray(canon.resize((bw, bh), Image.BILINEAR)).astype(np.float32) / 255.0
        if seam == 'feather':
            r = rng.uniform(1.0, max(1.5, min(6.0, 0.08 * min(bh, bw))))
            pad = int(3 * r) + 1
            a = gauss_blur(np.pad(a, pad), r)
            bh, bw = a.shape
            if bh > hmax or bw > wmax:                   # keep inside the image
                a = a[:hmax, :wmax]
                bh, bw = a.shape
    a = np.rint(np.clip(a, 0, 1) * 255) / 255.0
    a[a < 0.04] = 0
    if bh + 4 <= hmax and bw + 4 <= wmax:            # a frame of untouched pixels (for seamless blending)
        a = np.pad(a, 2)
        bh, bw = a.shape
    return a.astype(np.float32), bh, bw


# ----------------------------------------------------------------------------------------------------------------
# Forgery procedures. Each edits `img` (HxWx3 float32) in place inside a region and returns that region's alpha
# support (bool HxW): exactly the pixels whose value now comes, wholly or partly, from elsewhere.


def postprocess(rng, patch, strength, host_ref=None):
    """The pasted content's own history: colour/brightness/contrast/gamma changes, colour matching to the host,
    blur or sharpening, noise, a JPEG compression of its own. `strength` 0..1 scales how likely each is."""
    ops = []
    p = patch.astype(np.float32)
    if host_ref is not None and rng.random() < 0.35 * strength + 0.05:
        k = rng.uniform(0.3, 1.0)
        m0, s0 = p.reshape(-1, 3).mean(0), p.reshape(-1, 3).std(0) + 1e-3
        m1, s1 = host_ref.reshape(-1, 3).mean(0), host_ref.reshape(-1, 3).std(0) + 1e-3
        p = p + k * ((p - m0) * (s1 / s0) + m1 - p)
        ops.append('match%.1f' % k)
    if rng.random() < 0.6 * strength:
        gain = rng.uniform(0.85, 1.15, 3) if rng.random() < 0.5 else np.full(3, rng.uniform(0.8, 1.2))
        off = rng.uniform(-20, 20)
        p = p * gain + off
        if rng.random() < 0.4:
            g = rng.uniform(0.75, 1.35)
            p = 255.0 * (np.clip(p, 0, 255) / 255.0) ** g
        if rng.random() < 0.3:
            grey = p.mean(-1, keepdims=True)
            p = grey + rng.uniform(0.6, 1.4) * (p - grey)
        ops.append('colour')
    r = rng.random()
    if r < 0.25 * strength:
        p = gauss_blur(p, rng.uniform(0.5, 1.8))
        ops.append('blur')
    elif r < 0.4 * strength:
        b = gauss_blur(p, rng.uniform(0.7, 1.5))
        p = p + rng.uniform(0.3, 1.2) * (p - b)
        ops.append('sharpen')
    if rng.random() < 0.3 * strength:
        p = p + rng.normal(0, rng.uniform(1.0, 7.0), p.shape).astype(np.float32)
        ops.append('noise')
    if rng.random() < 0.4 * strength and min(p.shape[:2]) >= 8:
        q = int(rng.integers(35, 96))
        oy, ox = int(rng.integers(0, 8)), int(rng.integers(0, 8))     # its own 8x8 grid
        big = np.pad(to_u8(p), ((oy, 0), (ox, 0), (0, 0)), mode='edge')
        p = jpeg_roundtrip(big, q, int(rng.choice([0, 2])))[oy:, ox:].astype(np.float32)
        ops.append('jpeg%d' % q)
    return p, ops


def place(rng, h, w, bh, bw):
    return int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))


def composite(img, y, x, alpha, content, seamless=False):
    """Pastes content with alpha at (y, x). seamless: like Poisson (seamless) cloning or a healing brush, the
    content is first shifted by a smooth field that equals host - content around the region, so that its colours
    run into the host's without an edge."""
    bh, bw = alpha.shape
    reg = img[y:y + bh, x:x + bw]
    if seamless:
        inside = alpha > 0
        if (~inside).any():
            content = content + nc_fill(reg - content, inside)
    a = alpha[..., None]
    # a pixel with alpha 1 takes the content's value exactly; others blend
    img[y:y + bh, x:x + bw] = np.where(a >= 1, content, reg * (1 - a) + content * a)
    sup = np.zeros(img.shape[:2], bool)
    sup[y:y + bh, x:x + bw] = alpha > 0
    return sup


def take_crop(rng, src, bh, bw, scale):
    """A crop of `src` that, resized by `scale`, covers bh x bw; resized with a random filter."""
    H, W = src.shape[:2]
    ch, cw = min(H, max(2, int(round(bh / scale)))), min(W, max(2, int(round(bw / scale))))
    y, x = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
    c = src[y:y + ch, x:x + cw]
    filt = str(rng.choice(['bilinear', 'bicubic', 'lanczos', 'nearest', 'box'], p=[0.35, 0.3, 0.2, 0.05, 0.1]))
    if (ch, cw) != (bh, bw):
        c = resize(c, bw, bh, filt if not (filt == 'box' and ch < bh) else 'bilinear')
    return c.astype(np.float32), filt


def seam_style(rng):
    return str(rng.choice(['hard', 'aa', 'feather'], p=[0.3, 0.35, 0.35]))


def do_splice(rng, img, area, ctx, force_kind=None):
    h, w = img.shape[:2]
    use_cut = ctx['cutouts'] and (force_kind == 'cutout' or (force_kind is None and rng.random() < 0.3))
    if use_cut:                                        # an object cut-out with its own alpha
        c = ctx['cutouts'][int(rng.integers(len(ctx['cutouts'])))]
        rgba = c['img']
        if rng.random() < 0.5:
            rgba = rgba[:, ::-1]
        ah, aw = rgba.shape[:2]
        fill = max((rgba[..., 3] > 127).mean(), 0.05)
        s = math.sqrt(area / (fill * ah * aw))
        s = min(s, (h - 2) / ah, (w - 2) / aw)
        bh, bw = max(4, int(round(ah * s))), max(4, int(round(aw * s)))
        filt = str(rng.choice(['bilinear', 'bicubic', 'lanczos', 'box']))
        r = np.asarray(Image.fromarray(np.ascontiguousarray(rgba)).resize((bw, bh), FILTERS[filt]))
        alpha = r[..., 3].astype(np.float32) / 255.0
        seam = str(rng.choice(['asis', 'hard', 'feather'], p=[0.5, 0.25, 0.25]))
        if seam == 'hard':
            alpha = (alpha > 0.5).astype(np.float32)
        elif seam == 'feather':
            alpha = gauss_blur(alpha, rng.uniform(0.7, 2.5))
        alpha = np.rint(np.clip(alpha, 0, 1) * 255) / 255.0
        alpha[alpha < 0.04] = 0
        content = r[..., :3].astype(np.float32)
        y, x = place(rng, h, w, bh, bw)
        content, ops = postprocess(rng, content, 1.0, img[y:y + bh, x:x + bw])
        seamless = rng.random() < 0.1
        what = 'splice-cutout-%s' % seam
    else:
        kind = force_kind or str(rng.choice(SHAPES, p=[0.18, 0.2, 0.2, 0.1, 0.07, 0.25]))
        canon, kind = canonical_shape(rng, kind, ctx['cutouts'])
        seam = seam_style(rng)
        alpha, bh, bw = make_alpha(rng, canon, area, h, w, seam)
        donors = ctx['donors']
        d = donors[int(rng.integers(len(donors)))]['img']
        content, filt = take_crop(rng, d, bh, bw, log_uniform(rng, 0.4, 2.0))
        y, x = place(rng, h, w, bh, bw)
        content, ops = postprocess(rng, content, 1.0, img[y:y + bh, x:x + bw])
        ops = [filt] + ops
        seamless = rng.random() < 0.2
        what = 'splice-%s-%s' % (kind, seam)
    if seamless:
        ops.append('seamless')
    sup = composite(img, y, x, alpha, content, seamless)
    return sup, what + ('+' + '+'.join(ops) if ops else '')


def do_copymove(rng, img, area, ctx, force_kind=None):
    h, w = img.shape[:2]
    kind = force_kind or str(rng.choice(SHAPES, p=[0.2, 0.2, 0.2, 0.12, 0.08, 0.2]))
    canon, kind = canonical_shape(rng, kind, ctx['cutouts'])
    seam = seam_style(rng)
    alpha, bh, bw = make_alpha(rng, canon, area, h, w, seam)
    src = to_u8(img)
    ops = []
    tr = rng.random()
    if tr < 0.45:                                      # plain shift
        sy, sx = place(rng, h, w, bh, bw)
        content = img[sy:sy + bh, sx:sx + bw].copy()
    elif tr < 0.75:                                    # scaled
        content, filt = take_crop(rng, src, bh, bw, log_uniform(rng, 0.6, 1.6))
        ops.append('scale-' + filt)
    else:                                              # rotated (and maybe scaled)
        ang = rng.uniform(-45, 45) if rng.random() < 0.8 else float(rng.choice([90, 180, 270]))
        s = log_uniform(rng, 0.75, 1.35)
        side = int(math.ceil((bh + bw) / s)) + 4
        side = min(side, h, w)
        sy, sx = place(rng, h, w, side, side)
        patch = Image.fromarray(src[sy:sy + side, sx:sx + side])
        patch = patch.rotate(ang, resample=int(rng.choice([Image.BILINEAR, Image.BICUBIC])))
        ph, pw = max(2, int(round(bh / s))), max(2, int(round(bw / s)))
        ph, pw = min(ph, side), min(pw, side)
        oy, ox = (side - ph) // 2, (side - pw) // 2
        content = np.asarray(patch.crop((ox, oy, ox + pw, oy + ph)).resize((bw, bh), Image.BICUBIC))
        content = content.astype(np.float32)
        ops.append('rot%d' % int(ang))
    if rng.random() < 0.15:
        content = content[:, ::-1]
        ops.append('flip')
    # destination away from where the content came from (for a plain shift at least a third of the box away)
    for _ in range(20):
        y, x = place(rng, h, w, bh, bw)
        if tr >= 0.45 or abs(y - sy) > bh / 3 or abs(x - sx) > bw / 3:
            break
    content, more = postprocess(rng, np.ascontiguousarray(content), 0.5)
    seamless = rng.random() < 0.2
    if seamless:
        more.append('seamless')
    sup = composite(img, y, x, alpha, content, seamless)
    return sup, 'copymove-%s-%s' % (kind, seam) + ('+' + '+'.join(ops + more) if ops + more else '')


def nc_fill(reg, hole):
    """Fills the hole pixels of reg (HxWxC float) by normalised convolution at growing scales: each gets the
    Gaussian-weighted mean of the known pixels around it, from the finest scale at which it has any."""
    known = (~hole).astype(np.float32)
    out = reg.copy()
    done = ~hole
    sig = 1.5
    while not done.all() and sig < 4 * max(reg.shape):
        num = gauss_blur(reg * known[..., None], sig)
        den = gauss_blur(known, sig)
        ok = (den > 0.02) & ~done
        out[ok] = num[ok] / den[ok][:, None]
        done |= ok
        sig *= 1.7
    if not done.all():                                 # nothing known at all
        out[~done] = reg[~hole].mean(0) if (~hole).any() else 128
    return out


def fill_diffuse(img, hole, y0, x0, y1, x1):
    """A smooth fill of the hole (box y0:y1, x0:x1) from the pixels around it."""
    pad = max(y1 - y0, x1 - x0)
    Y0, X0, Y1, X1 = max(0, y0 - pad), max(0, x0 - pad), min(img.shape[0], y1 + pad), min(img.shape[1], x1 + pad)
    full = img.copy()
    full[Y0:Y1, X0:X1] = nc_fill(img[Y0:Y1, X0:X1], hole[Y0:Y1, X0:X1])
    return full


def do_removal(rng, img, area, ctx, force_kind=None):
    h, w = img.shape[:2]
    kind = force_kind or str(rng.choice(SHAPES, p=[0.2, 0.15, 0.25, 0.1, 0.15, 0.15]))
    canon, kind = canonical_shape(rng, kind, ctx['cutouts'])
    seam = str(rng.choice(['hard', 'aa', 'feather'], p=[0.3, 0.3, 0.4]))
    alpha, bh, bw = make_alpha(rng, canon, area, h, w, seam)
    y, x = place(rng, h, w, bh, bw)
    hole = np.zeros((h, w), bool)
    hole[y:y + bh, x:x + bw] = alpha > 0
    method = str(rng.choice(['diffuse', 'clone', 'patches', 'lines'], p=[0.3, 0.4, 0.2, 0.1]))
    ops = []
    if method == 'diffuse':
        fill = fill_diffuse(img, hole, y, x, y + bh, x + bw)[y:y + bh, x:x + bw]
    elif method == 'lines':                           # interpolate along rows (or columns) across the hole
        reg = img[y:y + bh, x:x + bw]
        hole_r = hole[y:y + bh, x:x + bw]
        t = rng.random() < 0.5
        if t:
            reg, hole_r = reg.transpose(1, 0, 2), hole_r.T
        fill = reg.copy()
        for i in range(reg.shape[0]):
            k = np.nonzero(~hole_r[i])[0]
            if len(k) == 0:
                continue
            for c in range(3):
                fill[i, :, c] = np.interp(np.arange(reg.shape[1]), k, reg[i, k, c])
        fill = gauss_blur(fill, rng.uniform(1.5, 4.0))
        if t:
            fill = fill.transpose(1, 0, 2)
        ops.append('cols' if t else 'rows')
    else:                                              # copy texture from next to the hole
        # the ring of known pixels around the hole, to choose sources whose surroundings match
        near = box_blur(hole[max(0, y - 6):y + bh + 6, max(0, x - 6):x + bw + 6].astype(np.float32), 4) > 0
        ry, rx = np.nonzero(near & ~hole[max(0, y - 6):y + bh + 6, max(0, x - 6):x + bw + 6])
        ry, rx = ry + max(0, y - 6), rx + max(0, x - 6)

        def offset():
            best, bestd = None, None
            for _ in range(12):
                ang = rng.uniform(0, 2 * math.pi)
                dist = rng.uniform(0.6, 1.6)
                dy, dx = int(round(math.sin(ang) * dist * bh)), int(round(math.cos(ang) * dist * bw))
                if 0 <= y + dy and y + dy + bh <= h and 0 <= x + dx and x + dx + bw <= w and (dy or dx):
                    ok = (ry + dy >= 0) & (ry + dy < h) & (rx + dx >= 0) & (rx + dx < w)
                    if not ok.any():
                        continue
                    dist2 = float(np.abs(img[ry[ok] + dy, rx[ok] + dx] - img[ry[ok], rx[ok]]).mean())
                    if bestd is None or dist2 < bestd:
                        best, bestd = (dy, dx), dist2
            return best
        if method == 'clone':
            o = offset()
            if o is None:
                method = 'diffuse'
                fill = fill_diffuse(img, hole, y, x, y + bh, x + bw)[y:y + bh, x:x + bw]
            else:
                fill = img[y + o[0]:y + o[0] + bh, x + o[1]:x + o[1] + bw].copy()
        else:
            # crude exemplar fill: tiles in scan order, each the best of a few known patches near the hole
            # (compared with the smooth fill, which carries the surroundings' colours)
            t = int(rng.integers(12, 41))
            fill = fill_diffuse(img, hole, y, x, y + bh, x + bw)[y:y + bh, x:x + bw]

            def coarse(a):                             # 2x2 block means: the tile's colour and gradient
                hh, ww = a.shape[0] // 2, a.shape[1] // 2
                if hh == 0 or ww == 0:
                    return np.repeat(a.mean((0, 1))[None], 4, 0)
                return np.array([a[i:i + hh, j:j + ww].mean((0, 1)) for i in (0, hh) for j in (0, ww)])
            for ty in range(0, bh, t):
                for tx in range(0, bw, t):
                    th, tw = min(t, bh - ty), min(t, bw - tx)
                    if not hole[y + ty:y + ty + th, x + tx:x + tx + tw].any():
                        continue
                    want = coarse(fill[ty:ty + th, tx:tx + tw])
                    best, bestd = None, None
                    for _ in range(24):
                        sy = y + ty + int(rng.integers(-bh - t, bh + t + 1))
                        sx = x + tx + int(rng.integers(-bw - t, bw + t + 1))
                        if 0 <= sy and sy + th <= h and 0 <= sx and sx + tw <= w \
                                and not hole[sy:sy + th, sx:sx + tw].any():
                            cand = img[sy:sy + th, sx:sx + tw]
                            dist = float(((coarse(cand) - want) ** 2).sum())
                            if bestd is None or dist < bestd:
                                best, bestd = cand, dist
                    if best is not None:
                        fill[ty:ty + th, tx:tx + tw] = best
            if rng.random() < 0.5:
                fill = gauss_blur(fill, rng.uniform(0.5, 1.2))
                ops.append('smooth')
            ops.append('tile%d' % t)
    if method in ('diffuse', 'lines') and rng.random() < 0.6:   # re-add grain
        ring = hole.copy()
        ring[max(0, y - 4):y + bh + 4, max(0, x - 4):x + bw + 4] = True
        ring &= ~hole
        sd = float(np.std(img[ring] - gauss_blur(img, 1.0)[ring])) if ring.any() else 2.0
        fill = fill + rng.normal(0, max(0.5, sd * rng.uniform(0.5, 1.2)), fill.shape).astype(np.float32)
        ops.append('grain')
    fill, more = postprocess(rng, fill, 0.3)
    seamless = method in ('clone', 'patches') and rng.random() < 0.4     # a healing brush
    if seamless:
        more.append('seamless')
    sup = composite(img, y, x, alpha, fill, seamless)
    return sup, 'removal-%s-%s-%s' % (method, kind, seam) + ('+' + '+'.join(ops + more) if ops + more else '')


PROCEDURES = {'splice': do_splice, 'copymove': do_copymove, 'removal': do_removal}


def pronounce(rng, img, mask):
    """A pronounced trace over the forged pixels (make_demo_data --pronounced): the pasted, moved or filled content
    gets strong noise, blur, a low-quality JPEG of its own, a coarse resampling or a strong sharpening, the kind
    of difference a noise or compression analysis shows at a glance. Returns the image and the op's name."""
    kind = str(rng.choice(['noise', 'blur', 'jpeg', 'resample', 'sharpen']))
    if kind == 'noise':
        sigma = rng.uniform(5.0, 16.0)
        alt = img + rng.normal(0, sigma, img.shape).astype(np.float32)
        name = 'noise%d' % round(sigma)
    elif kind == 'blur':
        sigma = rng.uniform(1.2, 2.8)
        alt = gauss_blur(img, sigma)
        name = 'blur%.1f' % sigma
    elif kind == 'jpeg':
        q = int(rng.integers(8, 36))
        oy, ox = int(rng.integers(0, 8)), int(rng.integers(0, 8))
        big = np.pad(to_u8(img), ((oy, 0), (ox, 0), (0, 0)), mode='edge')
        alt = jpeg_roundtrip(big, q, 2)[oy:, ox:].astype(np.float32)
        name = 'jpeg%d' % q
    elif kind == 'resample':
        f = rng.uniform(0.25, 0.5)
        h, w = img.shape[:2]
        small = resize(to_u8(img), max(1, int(round(w * f))), max(1, int(round(h * f))), 'bilinear')
        alt = resize(small, w, h, str(rng.choice(['nearest', 'bilinear']))).astype(np.float32)
        name = 'resample%.2f' % f
    else:
        b = gauss_blur(img, rng.uniform(1.0, 2.0))
        alt = img + rng.uniform(1.5, 3.0) * (img - b)
        name = 'sharpen'
    return np.where(mask[..., None], alt, img), 'strong-' + name


AREA = (0.01, 0.40)  # default range of a forged image's forged share (make_demo_data --area)


def forge(rng, work, ctx, force=None, force_kind=None, pronounced=False):
    """Forges a working image (HxWx3 uint8): 1-3 regions, 1-40 % of the image in all (ctx['area'] overrides the
    range), each spliced from another photo or a cut-out, copied and moved within the image, or removed (filled
    from its surroundings). Returns the forged image (uint8), the mask (bool: exactly the pixels whose value came
    from elsewhere or was synthesised) and a description."""
    h, w = work.shape[:2]
    img = work.astype(np.float32)
    mask = np.zeros((h, w), bool)
    total = log_uniform(rng, *ctx.get('area', AREA)) * h * w
    n = 1 if force else int(rng.choice([1, 2, 3], p=[0.7, 0.22, 0.08]))
    shares = rng.dirichlet(np.ones(n) * 2) if n > 1 else [1.0]
    what = []
    for s in shares:
        proc = force or str(rng.choice(['splice', 'copymove', 'removal'], p=[0.45, 0.3, 0.25]))
        sup, desc = PROCEDURES[proc](rng, img, max(16.0, s * total), ctx, force_kind)
        mask |= sup
        what.append(desc)
    if pronounced:
        img, op = pronounce(rng, img, mask)
        what.append(op)
    return to_u8(img), mask, ';'.join(what)


# ----------------------------------------------------------------------------------------------------------------
# The shared processing: crop and scale from the photo, optional earlier JPEG, final rescale and format.
# Forged and authentic samples draw these parameters from the same distributions.


def crop_params(rng, photo_hw, size):
    """Output size (short side `size`, aspect 1-1.5), working size (the size at which the forgery is made:
    equal to the output, or 1.1-2x it so that the final step downscales, or 0.7-0.95x so that it upscales) and
    the crop window in the photo (resized to the working size)."""
    H, W = photo_hw
    ar = rng.uniform(1.0, 1.5)
    oh, ow = (size, int(round(size * ar))) if rng.random() < 0.6 else (int(round(size * ar)), size)
    r = rng.random()
    f = 1.0 if r < 0.35 else (rng.uniform(1.1, 2.0) if r < 0.88 else rng.uniform(0.7, 0.95))
    wh, ww = max(8, int(round(oh * f))), max(8, int(round(ow * f)))
    gmax = min(H / wh, W / ww)
    if gmax < 1:                                        # small photo: work at what it has
        wh, ww = int(wh * gmax), int(ww * gmax)
        gmax = 1.0
    g = log_uniform(rng, 1.0, gmax) if gmax > 1.0001 and rng.random() < 0.8 else 1.0
    ch, cw = min(H, int(round(wh * g))), min(W, int(round(ww * g)))
    cy, cx = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
    return dict(out=(oh, ow), work=(wh, ww), crop=(cy, cx, ch, cw),
                crop_filter=str(rng.choice(['bilinear', 'bicubic', 'lanczos', 'box', 'hamming'])),
                pre_jpeg=int(rng.integers(60, 98)) if rng.random() < 0.3 else 0,
                pre_sub=int(rng.choice([0, 2])))


def work_image(photo, cp):
    cy, cx, ch, cw = cp['crop']
    a = photo[cy:cy + ch, cx:cx + cw]
    wh, ww = cp['work']
    if (ch, cw) != (wh, ww):
        a = resize(a, ww, wh, cp['crop_filter'])
    if cp['pre_jpeg']:                                  # an earlier JPEG save of the whole picture
        a = jpeg_roundtrip(a, cp['pre_jpeg'], cp['pre_sub'])
    return np.ascontiguousarray(a)


def final_params(rng):
    if rng.random() < 0.75:
        fmt = dict(fmt='jpeg', quality=int(rng.integers(50, 101)),
                   subsampling=int(rng.choice([0, 1, 2], p=[0.3, 0.1, 0.6])))
    else:
        fmt = dict(fmt='png', quality=0, subsampling=0)
    fmt['filter'] = str(rng.choice(['bilinear', 'bicubic', 'lanczos', 'box', 'hamming'],
                                   p=[0.3, 0.3, 0.25, 0.1, 0.05]))
    return fmt


def apply_final(img, mask, out_hw, fp):
    """Rescales the working image to the output size (the mask with the same geometry, nearest neighbour, then
    0/255) and encodes it. Returns (encoded bytes, extension, mask as uint8 0/255 or None)."""
    oh, ow = out_hw
    if img.shape[:2] != (oh, ow):
        filt = fp['filter'] if not (fp['filter'] == 'box' and img.shape[0] < oh) else 'bilinear'
        img = resize(img, ow, oh, filt)
        if mask is not None:
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((ow, oh), Image.NEAREST)) > 127
    b = io.BytesIO()
    if fp['fmt'] == 'jpeg':
        Image.fromarray(img).save(b, 'JPEG', quality=fp['quality'], subsampling=fp['subsampling'])
        ext = '.jpg'
    else:
        Image.fromarray(img).save(b, 'PNG', compress_level=6)
        ext = '.png'
    m = None if mask is None else (mask.astype(np.uint8) * 255)
    return b.getvalue(), ext, m


def make_sample(rng, photos, ctx, size, forged, force=None, force_kind=None, final_override=None, cp_override=None,
                pronounced=False):
    """One sample: picks a host photo, crops, forges (or not), applies the final processing. Forged samples whose
    mask after the final rescale covers less than 0.5 % or more than 50 % of the image are drawn again."""
    for _attempt in range(20):
        pi = int(rng.integers(len(photos)))
        photo = photos[pi]['img']
        cp = crop_params(rng, photo.shape[:2], size)
        if ctx.get('plain'):                            # diagnostic: no final rescale, PNG
            cp['work'] = cp['out']
        if cp_override:
            cp.update(cp_override)
        work = work_image(photo, cp)
        fp = final_params(rng)
        if ctx.get('plain'):
            fp.update(fmt='png', quality=0, subsampling=0)
        if final_override:
            fp.update(final_override)
        mask, desc = None, 'authentic'
        img = work
        if forged:
            others = [p for j, p in enumerate(photos) if j != pi] or photos
            img, mask, desc = forge(rng, work, dict(ctx, donors=ctx.get('donors') or others), force, force_kind,
                                    pronounced)
        data, ext, m = apply_final(img, mask, cp['out'], fp)
        if forged:
            frac = float((m > 0).mean())
            if not 0.005 <= frac <= 0.5:
                continue
        else:
            frac = 0.0
        return dict(photo=pi, cp=cp, fp=fp, work=work, forged_work=img, work_mask=mask, data=data, ext=ext,
                    mask=m, desc=desc, frac=frac)
    raise RuntimeError('no acceptable sample in 20 attempts')


# ----------------------------------------------------------------------------------------------------------------


def split_items(items, frac, seed, key):
    """Whole items to valid: about `frac` of each package (at least one where a package has 4 or more), chosen by a
    hash of the seed and the path so that adding photos does not reshuffle the others."""
    valid = set()
    by_pkg = {}
    for i, it in enumerate(items):
        by_pkg.setdefault(it['package'], []).append(i)
    for pkg, idx in by_pkg.items():
        idx = sorted(idx, key=lambda i: hashlib.sha256(('%s|%s|%s' % (seed, key, items[i]['path'])).encode()).digest())
        k = int(round(frac * len(idx)))
        if k == 0 and len(idx) >= 4:
            k = 1
        valid.update(idx[:k])
    return valid


def write_credits(path, photos, cutouts, skipped):
    lines = ['# Demo training data: credits', '',
             'The demo model was trained on forgeries made by `tools/make_demo_data.py` from the photographs and',
             'cut-outs below, all from Debian packages (Debian 12). Authors and licences are as given by each',
             "package's `debian/copyright`, the READMEs inside the GCompris resource bundles, KDE's `metadata.json`",
             "and LXQt's `wallpapers/License`. CC-BY and CC-BY-SA works require attribution; share-alike and GPL terms",
             'apply to the works themselves.', '']
    if skipped:
        lines += ['Packages skipped: ' + '; '.join('%s (%s)' % kv for kv in skipped.items()), '']
    for title, items in (('Photographs', photos), ('Cut-outs (splice donors)', cutouts)):
        lines += ['## ' + title, '', '| package | file | author | licence | split |', '|---|---|---|---|---|']
        for it in items:
            f = it['path'] + (' (%s)' % it['source'] if it.get('source') else '')
            lines.append('| %s | %s | %s | %s | %s |' % (it['package'], f.replace('|', '\\|'),
                                                        it['author'].replace('|', '/'), it['licence'], it['split']))
        lines.append('')
    with open(path, 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines))


_JOB = {}  # what write_sample needs, set per split before the workers fork


def write_sample(i):
    """Makes and writes sample i of the current split (it depends only on the seed, the split and i). Returns
    (forged, its line of meta-SPLIT.tsv)."""
    args, split, pool = _JOB['args'], _JOB['split'], _JOB['pool']
    rng = np.random.default_rng([args.seed, 0 if split == 'train' else 1, i])
    forged = bool(rng.random() < args.forged_frac)
    pronounced = forged and args.pronounced > 0 and bool(rng.random() < args.pronounced)
    s = make_sample(rng, pool, _JOB['ctx'], args.size, forged, pronounced=pronounced)
    stem = '%s-%05d' % (split, i)
    with open(os.path.join(_JOB['d_img'], stem + s['ext']), 'wb') as f:
        f.write(s['data'])
    if forged:
        Image.fromarray(s['mask']).save(os.path.join(_JOB['d_mask'], stem + '.png'))
    fp = s['fp']
    return forged, '\t'.join([stem + s['ext'], 'forged' if forged else 'authentic', '%.4f' % s['frac'],
                              pool[s['photo']]['path'], '%dx%d' % s['cp']['out'], '%dx%d' % s['cp']['work'],
                              str(s['cp']['pre_jpeg']), '%s%s/%s' % (fp['fmt'], fp['quality'] or '', fp['filter']),
                              s['desc']]) + '\n'


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--build', default='build', help='build directory (debs, unpacked packages, output)')
    ap.add_argument('--out', help='output folder (default BUILD/demo-data)')
    ap.add_argument('--seed', type=int, default=1)
    ap.add_argument('--train', type=int, default=2000, help='training images')
    ap.add_argument('--valid', type=int, default=300, help='validation images')
    ap.add_argument('--size', type=int, default=256, help='short side of the output images')
    ap.add_argument('--valid-frac', type=float, default=0.15, help='share of the photos kept for validation')
    ap.add_argument('--forged-frac', type=float, default=0.5)
    ap.add_argument('--pronounced', type=float, default=0.0,
                    help='share of forged samples whose forged pixels also get one pronounced trace (strong noise, '
                         'blur, low-quality JPEG, coarse resampling or sharpening); 0 keeps the default data')
    ap.add_argument('--area', type=float, nargs=2, default=list(AREA), metavar=('MIN', 'MAX'),
                    help='forged share of a forged image, drawn log-uniformly from MIN to MAX (%g %g)' % AREA)
    ap.add_argument('--plain', action='store_true',
                    help='diagnostic: no final rescale and PNG output for every sample (not realistic data)')
    ap.add_argument('--jobs', type=int, default=1, help='worker processes (the output does not depend on it)')
    args = ap.parse_args()
    if not 0.0 <= args.pronounced <= 1.0:
        ap.error('--pronounced must be from 0 to 1 (got %g)' % args.pronounced)
    if not 0.005 <= args.area[0] <= args.area[1] <= 0.5:
        ap.error('--area needs 0.005 <= MIN <= MAX <= 0.5 (got %g %g)' % tuple(args.area))
    if args.jobs < 1:
        ap.error('--jobs must be at least 1 (got %d)' % args.jobs)
    t0 = time.time()

    def log(msg):
        print('[%6.1fs] %s' % (time.time() - t0, msg), file=sys.stderr, flush=True)

    root = download_and_unpack(args.build, log)
    photos, skipped = load_photos(root, log)
    for k, v in skipped.items():
        log('SKIPPED package %s: %s' % (k, v))
    cutouts = load_cutouts(root, log)
    log('%d photos, %d cut-outs' % (len(photos), len(cutouts)))
    vp = split_items(photos, args.valid_frac, args.seed, 'photo')
    vc = split_items(cutouts, args.valid_frac, args.seed, 'cutout')
    for i, p in enumerate(photos):
        p['split'] = 'valid' if i in vp else 'train'
    for i, c in enumerate(cutouts):
        c['split'] = 'valid' if i in vc else 'train'
    out = args.out or os.path.join(args.build, 'demo-data')
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'sources.tsv'), 'w', encoding='utf-8') as f:
        f.write('package\tpath\tkind\tsplit\tw\th\tauthor\tlicence\tsource\tsha256_16\n')
        for kind, items in (('photo', photos), ('cutout', cutouts)):
            for it in items:
                f.write('\t'.join([it['package'], it['path'], kind, it['split'], str(it['img'].shape[1]),
                                   str(it['img'].shape[0]), it['author'], it['licence'], it.get('source', ''),
                                   it.get('sha', '')]) + '\n')
    write_credits(os.path.join(out, 'DATA-CREDITS.md'), photos, cutouts, skipped)
    for split, count in (('train', args.train), ('valid', args.valid)):
        pool = [p for p in photos if p['split'] == split]
        ctx = dict(cutouts=[c for c in cutouts if c['split'] == split], donors=None, area=tuple(args.area),
                   plain=args.plain)
        d_img, d_mask = os.path.join(out, split, 'images'), os.path.join(out, split, 'masks')
        for d in (d_img, d_mask):
            os.makedirs(d, exist_ok=True)
            for old in os.listdir(d):
                os.remove(os.path.join(d, old))
        nforged = 0
        _JOB.update(args=args, split=split, pool=pool, ctx=ctx, d_img=d_img, d_mask=d_mask)
        with open(os.path.join(out, 'meta-%s.tsv' % split), 'w', encoding='utf-8') as meta:
            meta.write('image\tlabel\tforged_frac\thost\tout_hw\twork_hw\tpre_jpeg\tfinal\tforgery\n')
            workers = multiprocessing.get_context('fork').Pool(args.jobs) if args.jobs > 1 else None
            lines = workers.imap(write_sample, range(count), 16) if workers else map(write_sample, range(count))
            for i, (forged, line) in enumerate(lines):
                nforged += forged
                meta.write(line)
                if (i + 1) % 200 == 0:
                    log('%s %d/%d' % (split, i + 1, count))
            if workers:
                workers.close()
                workers.join()
        log('%s: %d images (%d forged) from %d photos' % (split, count, nforged, len(pool)))
    log('done: %s' % out)


if __name__ == '__main__':
    main()
