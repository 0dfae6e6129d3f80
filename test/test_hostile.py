#!/usr/bin/env python3
"""test_hostile.py LOUPE MODEL [--table FILE]: the command line against hostile inputs.

Damaged images (zero-length, wrong magic, truncated, bit-flipped, huge dimensions) and
damaged weight files (truncated, bit-flipped, zero-length, wrong magic or version, missing
tensors, an index that points outside the file, overlaps or disagrees with the header),
each made here from good files. For every input the command must
  - exit with the status it documents (1: a file could not be used) and not crash
    (status < 128, no sanitizer report);
  - print exactly one message on stderr that names the file and the problem;
  - leave no output file behind for it (no mask, no overlay, no *.part file);
and an image is also run in a batch (good, bad, good) with -o: both good images still
get their line, mask and overlay, predictions.txt holds exactly their two lines, and the
exit status reports the failure. Bad labelled datasets given to `loupe eval` (a missing,
undecodable or truncated file, a mask of another size, two masks or images with one stem,
a mask without an image, a bad list line, an image listed twice, an empty set) must exit
1 with one message naming the file (and the list line), print no metrics and write no
output file. Sweeps (truncation at many offsets, bit flips at many
positions) may also decode or load when the damage is harmless; then the run must succeed
completely. --table writes the measured table (input, exit status, message) as Markdown.
Prints "N passed, M failed"."""
import os
import random
import re
import shutil
import shlex
import struct
import subprocess
import sys
import tempfile
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
GOOD_PNG = os.path.join(HERE, 'corpus', 'png', 'basn2c08.png')        # 32x32 RGB
GOOD_JPEG = os.path.join(HERE, 'corpus', 'jpeg', 'face_33x17_422.jpg')  # 33x17 4:2:2
GOOD_PPM = os.path.join(HERE, 'fuzz', 'ppm', 'rgb.ppm')
TRUNCATION_POINTS = 48   # offsets per truncation sweep
FLIPS = 48               # positions per bit-flip sweep
SEED = 6                 # the sweeps' random positions
SANITIZER = re.compile(r'Sanitizer|runtime error:|LeakSanitizer')
WEIGHT_HEADER = 64
HPARAM_RECORD = 48


class Suite:
    def __init__(self, loupe, model, tmp):
        self.loupe, self.model, self.tmp = loupe, model, tmp
        self.passed = self.failed = 0
        self.rows = []  # (input, exit status, message) for the table

    def check(self, ok, what):
        if ok:
            self.passed += 1
        else:
            self.failed += 1
            print('FAIL ' + what)
        return ok

    def run(self, args):
        """Runs loupe; returns (status, stdout, stderr lines)."""
        # $RUN: the emulator prefix of cross builds (see the Makefile)
        p = subprocess.run(shlex.split(os.environ.get('RUN', '')) + [self.loupe] + args,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return p.returncode, p.stdout.decode('utf-8', 'replace'), p.stderr.decode('utf-8', 'replace').splitlines()

    def write(self, name, data):
        path = os.path.join(self.tmp, name)
        with open(path, 'wb') as f:
            f.write(data)
        return path

    def no_crash(self, status, err, what):
        return self.check(0 <= status < 128 and not any(SANITIZER.search(l) for l in err),
                          what + ': no crash (status %d)' % status)

    def one_message(self, err, path, pattern, what):
        """Exactly one line on stderr: 'loupe: PATH: ...' matching pattern."""
        ok = len(err) == 1 and err[0].startswith('loupe: %s: ' % path) and re.search(pattern, err[0]) is not None
        return self.check(ok, what + ': one message naming the file and /%s/ (got %r)' % (pattern, err))

    def message(self, err, path):
        """The message without 'loupe: ' and the temporary directory (for the table)."""
        return ' / '.join(l.replace('loupe: ', '', 1).replace(self.tmp + '/', '') for l in err)

    # ---- images ----

    def image_batch(self, path, what):
        """good, path, good with -o and --overlay: the good ones complete, path leaves nothing."""
        out = tempfile.mkdtemp(dir=self.tmp)
        status, stdout, err = self.run(['-q', '-m', self.model, '-o', out, '--overlay', GOOD_PNG, path, GOOD_JPEG])
        self.no_crash(status, err, what + ' in a batch')
        lines = stdout.splitlines()
        names = [l.split(',')[0] for l in lines]
        self.check(status == 1, what + ': a batch with it exits 1 (got %d)' % status)
        self.check(names == ['basn2c08.png', 'face_33x17_422.jpg'],
                   what + ': the good images of the batch get their results (got %r)' % lines)
        with open(os.path.join(out, 'predictions.txt')) as f:
            self.check(f.read() == stdout, what + ': predictions.txt holds the good lines')
        files = sorted(os.path.relpath(os.path.join(d, n), out) for d, _, ns in os.walk(out) for n in ns)
        self.check(files == ['masks/basn2c08.png', 'masks/face_33x17_422.png', 'overlays/basn2c08.png',
                             'overlays/face_33x17_422.png', 'predictions.txt'],
                   what + ': only the good images have outputs, no partial files (got %r)' % files)
        shutil.rmtree(out)

    def bad_image(self, label, name, data, pattern, extra=()):
        """A damaged image alone (status, message, nothing written) and in a batch."""
        path = self.write(name, data) if data is not None else os.path.join(self.tmp, name)
        out = tempfile.mkdtemp(dir=self.tmp)
        status, stdout, err = self.run(list(extra) + ['-m', self.model, '-o', out, path])
        self.no_crash(status, err, label)
        self.check(status == 1, label + ': exits 1 (got %d)' % status)
        self.check(stdout == '', label + ': prints no result')
        self.one_message(err, path, pattern, label)
        files = sorted(n for _, _, ns in os.walk(out) for n in ns)
        self.check(files == ['predictions.txt'], label + ': writes no mask or partial file (got %r)' % files)
        self.rows.append((label, status, self.message(err, path)))
        if not extra:
            self.image_batch(path, label)
        shutil.rmtree(out)

    def image_sweep(self, label, name, variants):
        """Many variants of one image in one batch between two good images: each is either
        refused with one message and no output, or decoded with all its outputs."""
        paths = [self.write('%s.%d%s' % (os.path.splitext(name)[0], i, os.path.splitext(name)[1]), v)
                 for i, v in enumerate(variants)]
        out = tempfile.mkdtemp(dir=self.tmp)
        status, stdout, err = self.run(['-q', '-m', self.model, '-o', out, GOOD_PNG] + paths + [GOOD_JPEG])
        self.no_crash(status, err, label)
        results = dict(l.rsplit(',', 1) for l in stdout.splitlines())
        refused, decoded, messages, ok = 0, 0, {}, True
        for p in paths:
            base = os.path.basename(p)
            mine = [l for l in err if l.startswith('loupe: %s: ' % p)]
            stem = os.path.splitext(base)[0]
            has_mask = os.path.exists(os.path.join(out, 'masks', stem + '.png'))
            if base in results:
                decoded += 1
                ok = ok and not mine and has_mask
            else:
                refused += 1
                ok = ok and len(mine) == 1 and not has_mask
                if mine:
                    msg = mine[0][len('loupe: %s: ' % p):]
                    messages[msg] = messages.get(msg, 0) + 1
        self.check(ok, label + ': each variant decodes completely or is refused with one message and no output')
        self.check(len(err) == refused, label + ': one stderr line per refused variant, nothing else')
        self.check('basn2c08.png' in results and 'face_33x17_422.jpg' in results,
                   label + ': the good images around them get their results')
        self.check(status == (1 if refused else 0), label + ': the exit status reports the failures')
        self.check(not any(n.endswith('.part') for _, _, ns in os.walk(out) for n in ns),
                   label + ': no partial files')
        summary = '; '.join('%s (%d)' % (m, n) for m, n in sorted(messages.items(), key=lambda x: -x[1]))
        self.rows.append(('%s: %d variants, %d refused, %d decoded' % (label, len(variants), refused, decoded),
                          status, summary))
        shutil.rmtree(out)

    # ---- labelled datasets (loupe eval) ----

    def bad_dataset(self, label, data, names, pattern):
        """loupe eval on a bad dataset: exit 1, nothing on stdout, one message naming every
        file in names and matching pattern, no output file (nor a partial one)."""
        out = os.path.join(self.tmp, 'eval-out.csv')
        status, stdout, err = self.run(['eval', '-q', '-m', self.model, '-o', out, data])
        self.no_crash(status, err, label)
        self.check(status == 1, label + ': exits 1 (got %d)' % status)
        self.check(stdout == '', label + ': prints no metrics')
        ok = len(err) == 1 and err[0].startswith('loupe: ') and all(n in err[0] for n in names) and \
            re.search(pattern, err[0]) is not None
        self.check(ok, label + ': one message naming %r and /%s/ (got %r)' % (names, pattern, err))
        self.check(not os.path.exists(out) and not os.path.exists(out + '.part'), label + ': writes no output file')
        self.rows.append((label, status, self.message(err, data)))

    # ---- weight files ----

    def bad_model(self, label, data, pattern, name='model.bin'):
        path = self.write(name, data) if data is not None else os.path.join(self.tmp, name)
        out = os.path.join(self.tmp, 'model-out')
        status, stdout, err = self.run(['-m', path, '-o', out, GOOD_PNG])
        self.no_crash(status, err, label)
        self.check(status == 1, label + ': exits 1 (got %d)' % status)
        self.check(stdout == '', label + ': prints no result')
        self.one_message(err, path, pattern, label)
        self.check(not os.path.exists(out), label + ': creates no output')
        self.rows.append((label, status, self.message(err, path)))

    def model_sweep(self, label, variants):
        """Each damaged model is refused with one message, or loads and runs completely."""
        path = os.path.join(self.tmp, 'sweep.bin')
        refused, loaded, messages, ok = 0, 0, {}, True
        statuses = set()
        for v in variants:
            self.write('sweep.bin', v)
            out = os.path.join(self.tmp, 'sweep-out')
            status, stdout, err = self.run(['-q', '-m', path, '-o', out, GOOD_PNG])
            statuses.add(status)
            ok = ok and 0 <= status < 128 and not any(SANITIZER.search(l) for l in err)
            if status == 0:
                loaded += 1
                ok = ok and not err and stdout.startswith('basn2c08.png,') and \
                    os.path.exists(os.path.join(out, 'masks', 'basn2c08.png'))
            else:
                refused += 1
                ok = ok and status == 1 and stdout == '' and len(err) == 1 and \
                    err[0].startswith('loupe: %s: ' % path) and not os.path.exists(out)
                msg = err[0][len('loupe: %s: ' % path):] if err else '(none)'
                msg = re.sub(r'\b\d+\b', 'N', re.sub(r'(tensors?) (?!index\b)[\w.]+( and [\w.]+)?', r'\1 T', msg))
                messages[msg] = messages.get(msg, 0) + 1
            shutil.rmtree(out, ignore_errors=True)
        self.check(ok, label + ': every variant is refused with one message (exit 1, no output) or runs completely')
        summary = '; '.join('%s (%d)' % (m, n) for m, n in sorted(messages.items(), key=lambda x: -x[1]))
        self.rows.append(('%s: %d variants, %d refused, %d loaded' % (label, len(variants), refused, loaded),
                          '/'.join(str(s) for s in sorted(statuses)), summary))


# ---- building damaged files ----

def png_chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)


def png_with_size(width, height):
    """A PNG whose header claims width x height RGB, with a few bytes of image data."""
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + png_chunk(b'IHDR', ihdr) + png_chunk(b'IDAT', zlib.compress(b'\0' * 64)) +
            png_chunk(b'IEND', b''))


def png_patch_ihdr(png, field_offset, value):
    """Changes one IHDR byte (0 = first byte of width) and fixes the CRC."""
    b = bytearray(png)
    b[16 + field_offset] = value
    b[29:33] = struct.pack('>I', zlib.crc32(bytes(b[12:29])) & 0xffffffff)
    return bytes(b)


def jpeg_with_size(jpeg, width, height):
    """The JPEG with its SOF header claiming width x height."""
    b = bytearray(jpeg)
    i = 2
    while i + 4 <= len(b):
        marker, length = b[i + 1], struct.unpack('>H', b[i + 2:i + 4])[0]
        if 0xc0 <= marker <= 0xcf and marker not in (0xc4, 0xc8, 0xcc):
            b[i + 5:i + 9] = struct.pack('>HH', height, width)
            return bytes(b)
        i += 2 + length
    raise ValueError('no SOF')


def jpeg_marker_offset(jpeg, marker):
    i = 2
    while i + 4 <= len(jpeg):
        if jpeg[i + 1] == marker:
            return i
        i += 2 + struct.unpack('>H', jpeg[i + 2:i + 4])[0]
    raise ValueError('no marker %02x' % marker)


def gray_png(width, height, value=255):
    """An 8-bit gray PNG of one value with a 0 border row (a valid forgery mask)."""
    rows = b''.join(b'\0' + (bytes(width) if y == 0 else bytes([value]) * width) for y in range(height))
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + png_chunk(b'IHDR', ihdr) + png_chunk(b'IDAT', zlib.compress(rows)) +
            png_chunk(b'IEND', b''))


def make_dataset(root, images, masks):
    """root/images/NAME = data and root/masks/NAME = data; returns root."""
    for sub, files in (('images', images), ('masks', masks)):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(root, sub, name), 'wb') as f:
                f.write(data)
    return root


def flip(data, pos, bit):
    b = bytearray(data)
    b[pos] ^= 1 << bit
    return bytes(b)


def truncations(data, n):
    """n cut points spread over the whole file (1 .. len-1), always including the last byte."""
    points = sorted(set([max(1, len(data) * i // n) for i in range(n)] + [len(data) - 1]))
    return [data[:k] for k in points if 0 < k < len(data)]


class Weights:
    """The header and index of a loupe weight file, for making damaged copies."""

    def __init__(self, data):
        self.data = data
        self.version, self.n_hp, self.n_t = struct.unpack('<III', data[8:20])
        self.data_offset, self.file_size = struct.unpack('<QQ', data[24:40])
        self.entries = []  # name -> (record position, name, ndim)
        pos = WEIGHT_HEADER + self.n_hp * HPARAM_RECORD
        for _ in range(self.n_t):
            name_len, dtype, ndim = struct.unpack('<HBB', data[pos:pos + 4])
            name = data[pos + 4:pos + 4 + name_len].decode()
            self.entries.append((pos, name, ndim))
            pos += 4 + name_len + 4 * ndim + 16
        self.index_end = pos

    def patch(self, pos, fmt, value):
        b = bytearray(self.data)
        struct.pack_into(fmt, b, pos, value)
        return bytes(b)

    def entry(self, name):
        for pos, n, ndim in self.entries:
            if n == name:
                return pos, ndim
        raise KeyError(name)

    def offset_pos(self, name):
        """Where the tensor's u64 data offset is stored (nbytes follows)."""
        pos, ndim = self.entry(name)
        return pos + 4 + len(name) + 4 * ndim

    def hparam_pos(self, name):
        for i in range(self.n_hp):
            pos = WEIGHT_HEADER + i * HPARAM_RECORD
            if self.data[pos:pos + 40].rstrip(b'\0') == name.encode():
                return pos
        raise KeyError(name)


def main():
    args = sys.argv[1:]
    table = None
    if '--table' in args:
        i = args.index('--table')
        table = args[i + 1]
        del args[i:i + 2]
    if len(args) != 2:
        print(__doc__)
        return 2
    loupe, model = os.path.abspath(args[0]), os.path.abspath(args[1])
    tmp = tempfile.mkdtemp(prefix='loupe-hostile.')
    s = Suite(loupe, model, tmp)
    rnd = random.Random(SEED)
    try:
        png = open(GOOD_PNG, 'rb').read()
        jpeg = open(GOOD_JPEG, 'rb').read()
        ppm = open(GOOD_PPM, 'rb').read()

        # images: one damage each, alone and in a batch
        s.bad_image('PNG, zero-length', 'empty.png', b'', 'empty file')
        s.bad_image('JPEG, zero-length', 'empty.jpg', b'', 'empty file')
        s.bad_image('PPM, zero-length', 'empty.ppm', b'', 'empty file')
        s.bad_image('text file named .png (wrong magic)', 'notes.png', b'just some text\n', 'not a PNG, JPEG or PPM')
        s.bad_image('PNG with a damaged signature', 'badsig.png', flip(png, 1, 0), 'not a PNG, JPEG or PPM')
        s.bad_image('missing image file', 'no-such-file.png', None, 'cannot open')
        s.bad_image('PNG truncated in the signature (4 bytes)', 'cut4.png', png[:4], 'not a PNG')
        s.bad_image('PNG truncated in the IHDR (20 bytes)', 'cut20.png', png[:20], 'PNG')
        s.bad_image('PNG truncated in the image data (at 2/3)', 'cutdata.png', png[:len(png) * 2 // 3], 'truncated')
        s.bad_image('PNG, IHDR CRC bit-flipped', 'crc.png', flip(png, 30, 3), 'bad CRC')
        s.bad_image('PNG, IHDR colour type 5', 'ctype.png', png_patch_ihdr(png, 9, 5), 'PNG')
        s.bad_image('PNG, IHDR bit depth 3', 'depth.png', png_patch_ihdr(png, 8, 3), 'PNG')
        s.bad_image('PNG claiming 100000x100000', 'huge.png', png_with_size(100000, 100000), 'too large')
        s.bad_image('PNG claiming 12000x9000 (above the 100 MP budget)', 'budget.png', png_with_size(12000, 9000),
                    'more than the limit of 100000000')
        s.bad_image('PNG 32x32 with --max-pixels 1000', 'small.png', png, 'more than the limit of 1000',
                    extra=('--max-pixels', '1000'))
        s.bad_image('JPEG truncated after SOI (2 bytes)', 'cut2.jpg', jpeg[:2], 'JPEG')
        s.bad_image('JPEG truncated in the entropy-coded data (half)', 'half.jpg', jpeg[:len(jpeg) // 2], 'JPEG')
        s.bad_image('JPEG with SOI bit-flipped (wrong magic)', 'soi.jpg', flip(jpeg, 1, 0), 'not a PNG, JPEG or PPM')
        sof = jpeg_marker_offset(jpeg, 0xc0)
        s.bad_image('JPEG, SOF precision 12', 'prec.jpg', flip(jpeg, sof + 4, 2), 'JPEG')
        s.bad_image('JPEG claiming 65535x65535', 'huge.jpg', jpeg_with_size(jpeg, 65535, 65535),
                    'more than the limit of 100000000')
        s.bad_image('JPEG claiming 0x17', 'zero.jpg', jpeg_with_size(jpeg, 0, 17), 'JPEG')
        s.bad_image('PPM truncated in the pixels', 'cut.ppm', ppm[:-5], 'PPM')
        s.bad_image('PPM claiming 100000x100000', 'huge.ppm', b'P6 100000 100000 255\n' + b'\0' * 64, 'too large|limit')
        s.bad_image('PPM with maxval 0', 'maxval0.ppm', b'P6 2 2 0\n' + b'\0' * 12, 'PPM')

        # images: sweeps
        s.image_sweep('PNG truncated at many offsets', 'cut.png', truncations(png, TRUNCATION_POINTS))
        s.image_sweep('JPEG truncated at many offsets', 'cut.jpg', truncations(jpeg, TRUNCATION_POINTS))
        s.image_sweep('PPM truncated at every offset', 'cut.ppm', truncations(ppm, len(ppm)))
        s.image_sweep('PNG bit-flipped at random positions', 'flip.png',
                      [flip(png, rnd.randrange(len(png)), rnd.randrange(8)) for _ in range(FLIPS)])
        s.image_sweep('JPEG bit-flipped at random positions', 'flip.jpg',
                      [flip(jpeg, rnd.randrange(len(jpeg)), rnd.randrange(8)) for _ in range(FLIPS)])

        # labelled datasets for loupe eval: every bad entry stops the run before any compute
        mask32 = gray_png(32, 32)
        good = {'a.png': png, 'b.jpg': jpeg}
        d = make_dataset(os.path.join(tmp, 'ds-good'), good, {'a.png': mask32})
        status, stdout, err = s.run(['eval', '-q', '-m', model, d])
        s.check(status == 0 and not err and 'images 2' in stdout, 'a good dataset is evaluated (got %d %r)' % (status, err))
        d = make_dataset(os.path.join(tmp, 'ds-badmask'), good, {'a.png': b'not an image at all'})
        s.bad_dataset('dataset folder, undecodable mask', d, [os.path.join(d, 'masks', 'a.png')], 'not a PNG, JPEG')
        d = make_dataset(os.path.join(tmp, 'ds-cutmask'), good, {'a.png': mask32[:len(mask32) // 2]})
        s.bad_dataset('dataset folder, truncated mask', d, [os.path.join(d, 'masks', 'a.png')], 'PNG')
        d = make_dataset(os.path.join(tmp, 'ds-size'), good, {'b.png': gray_png(32, 17)})
        s.bad_dataset('dataset folder, mask of another size', d,
                      [os.path.join(d, 'masks', 'b.png'), os.path.join(d, 'images', 'b.jpg')], '32x17 .* 33x17')
        d = make_dataset(os.path.join(tmp, 'ds-badimage'), {'a.png': png, 'c.png': png[:40]}, {})
        s.bad_dataset('dataset folder, truncated image', d, [os.path.join(d, 'images', 'c.png')], 'PNG')
        d = make_dataset(os.path.join(tmp, 'ds-twomasks'), good, {'a.png': mask32, 'a.ppm': b'P5 32 32 255\n' + bytes(1024)})
        s.bad_dataset('dataset folder, two masks with one stem', d, [os.path.join(d, 'masks', 'a.png'),
                      os.path.join(d, 'masks', 'a.ppm')], 'two masks with the stem "a"')
        d = make_dataset(os.path.join(tmp, 'ds-twoimages'), {'a.png': png, 'a.jpg': jpeg}, {})
        s.bad_dataset('dataset folder, two images with one stem', d, [os.path.join(d, 'images', 'a.png'),
                      os.path.join(d, 'images', 'a.jpg')], 'two images with the stem "a"')
        d = make_dataset(os.path.join(tmp, 'ds-orphan'), good, {'typo.png': mask32})
        s.bad_dataset('dataset folder, mask without an image', d, [os.path.join(d, 'masks', 'typo.png')],
                      'no image .* stem "typo"')
        d = make_dataset(os.path.join(tmp, 'ds-empty'), {}, {})
        s.bad_dataset('dataset folder, empty', d, [d], 'empty')
        d = os.path.join(tmp, 'ds-nomasks')
        os.makedirs(os.path.join(d, 'images'))
        s.bad_dataset('dataset folder without masks/', d, [d], 'masks/ is missing')
        s.bad_dataset('dataset path that does not exist', os.path.join(tmp, 'no-such-set'),
                      [os.path.join(tmp, 'no-such-set')], 'cannot open')
        d = make_dataset(os.path.join(tmp, 'ds-budget'), good, {'a.png': mask32})
        status, stdout, err = s.run(['eval', '-q', '--max-pixels', '1000', '-m', model, d])
        s.check(status == 1 and len(err) == 1 and os.path.join(d, 'images', 'a.png') in err[0] and
                'limit of 1000' in err[0], 'dataset with an image above --max-pixels is refused, naming it (got %r)' % err)
        d = make_dataset(os.path.join(tmp, 'ds-list'), good, {'a.png': mask32})
        lst = s.write('missing.txt', b'# the set\n%s %s\n%s\n' % (os.path.join(d, 'images', 'a.png').encode(),
                      os.path.join(d, 'masks', 'a.png').encode(), os.path.join(d, 'images', 'gone.png').encode()))
        s.bad_dataset('dataset list, missing image', lst, [lst + ':3:', os.path.join(d, 'images', 'gone.png')],
                      'cannot open')
        lst = s.write('fields.txt', b'\n%s %s extra\n' % (os.path.join(d, 'images', 'a.png').encode(),
                                                          os.path.join(d, 'masks', 'a.png').encode()))
        s.bad_dataset('dataset list, line with 3 fields', lst, [lst + ':2:'], 'expected IMAGE \\[MASK\\]')
        lst = s.write('twice.txt', b'%s\n%s\n' % ((os.path.join(d, 'images', 'b.jpg').encode(),) * 2))
        s.bad_dataset('dataset list, image listed twice', lst, [lst + ':2:'], 'already listed on line 1')
        lst = s.write('relmask.txt', b'images/b.jpg masks/a.png\n')
        shutil.copytree(os.path.join(d, 'images'), os.path.join(tmp, 'images'))
        shutil.copytree(os.path.join(d, 'masks'), os.path.join(tmp, 'masks'))
        s.bad_dataset('dataset list, relative paths, mask of another size', lst,
                      [lst + ':1:', os.path.join(tmp, 'masks', 'a.png'), os.path.join(tmp, 'images', 'b.jpg')],
                      '32x32 .* 33x17')
        lst = s.write('comments.txt', b'# only comments\n\n   \n')
        s.bad_dataset('dataset list, empty (comments only)', lst, [lst], 'empty')
        lst = s.write('several.txt', b'images/b.jpg masks/a.png\nimages/nope.png\nimages/a.png\n')
        s.bad_dataset('dataset list, two bad entries: the first is named, the other counted', lst,
                      [lst + ':1:'], 'and 1 other bad entry')

        # weight files
        wd = open(model, 'rb').read()
        w = Weights(wd)
        first, second = w.entries[0][1], w.entries[1][1]
        s.bad_model('weights, zero-length', b'', 'file is empty')
        s.bad_model('weights, missing file', None, 'cannot open', name='no-such-model.bin')
        s.bad_model('weights, a directory', None, 'not a regular file', name='.')
        s.bad_model('weights, wrong magic', b'LOUPEWTX' + wd[8:], 'bad magic')
        s.bad_model('weights, a PNG given as the model', png, 'bad magic')
        s.bad_model('weights, version 3 (newer than this build)', w.patch(8, '<I', 3), 'version 3 is not supported')
        s.bad_model('weights, version 0', w.patch(8, '<I', 0), 'version 0 is not supported')
        s.bad_model('weights, truncated in the header (40 bytes)', wd[:40], 'shorter than the 64-byte header')
        s.bad_model('weights, truncated in the index', wd[:w.index_end - 10], 'truncated')
        s.bad_model('weights, truncated by one byte', wd[:-1], 'truncated')
        s.bad_model('weights, one byte appended', wd + b'\0', 'padded')
        s.bad_model('weights, header file size disagrees', w.patch(32, '<Q', w.file_size + 64), 'header says')
        s.bad_model('weights, header tensor count 0', w.patch(16, '<I', 0), 'implausible')
        s.bad_model('weights, header tensor count one too many', w.patch(16, '<I', w.n_t + 1),
                    'index runs into the data|malformed')
        s.bad_model('weights, header hyperparameter count 2^32-1', w.patch(12, '<I', 0xffffffff), 'implausible')
        s.bad_model('weights, data offset misaligned', w.patch(24, '<Q', w.data_offset + 4), 'not 64-byte aligned')
        s.bad_model('weights, data offset past the end', w.patch(24, '<Q', w.file_size + 64), 'past the end')
        s.bad_model('weights, missing tensor', w.patch(w.entry(second)[0] + 4, '<B', ord('X')),
                    'tensor %s is missing' % re.escape(second))
        s.bad_model('weights, missing hyperparameter', w.patch(w.hparam_pos('width'), '<B', ord('X')),
                    'hyperparameter width is missing')
        s.bad_model('weights, hyperparameter out of range', w.patch(w.hparam_pos('image_size') + 40, '<d', 1e9),
                    'image_size = 1e\\+09 is outside the supported range')
        s.bad_model('weights, hyperparameter disagrees with the tensors',
                    w.patch(w.hparam_pos('width') + 40, '<d', 16.0), 'has shape')
        s.bad_model('weights, tensor offset outside the file', w.patch(w.offset_pos(first), '<Q', w.file_size + 64),
                    'points outside the file')
        s.bad_model('weights, tensor size runs past the end', w.patch(w.offset_pos(first) + 8, '<Q', w.file_size),
                    'bytes do not match|points outside')
        s.bad_model('weights, two tensors overlap',
                    w.patch(w.offset_pos(second), '<Q', struct.unpack('<Q', wd[w.offset_pos(first):][:8])[0]),
                    'overlap')
        s.bad_model('weights, tensor shape disagrees with its size',
                    w.patch(w.entry(first)[0] + 4 + len(first), '<I', 3), 'bytes do not match')
        s.bad_model('weights, unknown dtype', w.patch(w.entry(first)[0] + 2, '<B', 7), 'unknown dtype')
        s.model_sweep('weights truncated at many offsets', truncations(wd, TRUNCATION_POINTS))
        s.model_sweep('weights bit-flipped in the header and index',
                      [flip(wd, rnd.randrange(w.index_end), rnd.randrange(8)) for _ in range(FLIPS)])
        s.model_sweep('weights bit-flipped in the tensor data',
                      [flip(wd, rnd.randrange(w.data_offset, len(wd)), rnd.randrange(8)) for _ in range(8)])
    finally:
        shutil.rmtree(tmp)

    if table:
        with open(table, 'w') as f:
            f.write('| input | exit status | message |\n|---|---|---|\n')
            for label, status, msg in s.rows:
                f.write('| %s | %s | %s |\n' % (label, status, msg.replace('|', '\\|')))
    print('test_hostile: %d passed, %d failed' % (s.passed, s.failed))
    return 0 if s.failed == 0 else 1


if __name__ == '__main__':
    sys.exit(main())
