#!/usr/bin/env python3
"""Tests for tools/convert.py (Python 3 standard library only).

Usage:
    python3 test/test_convert.py [GOLDEN_DIR]

Golden cases (tiny-a, tiny-b, full-1) are looked up in GOLDEN_DIR (or $LOUPE_GOLDEN_DIR),
then test/golden/, then /work/shared/golden/.  Tests whose case folder is not found are
skipped.  Prints "N passed, N failed" last; exits non-zero on any failure.
"""
import array
import copy
import importlib.util
import json
import math
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import traceback
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT = os.path.join(REPO, "tools", "convert.py")
GOLDEN_FALLBACKS = [os.path.join(REPO, "test", "golden"), "/work/shared/golden"]

sys.dont_write_bytecode = True                 # leave no __pycache__ in tools/
spec = importlib.util.spec_from_file_location("convert", CONVERT)
convert = importlib.util.module_from_spec(spec)
spec.loader.exec_module(convert)


class Skip(Exception):
    """Raised by a test whose inputs are not available."""


def golden_case(case):
    """Folder of a golden case, from the first golden directory that has it."""
    dirs = [d for d in (sys.argv[1] if len(sys.argv) > 1 else None, os.environ.get("LOUPE_GOLDEN_DIR")) if d]
    for d in dirs + GOLDEN_FALLBACKS:
        if os.path.isfile(os.path.join(d, case, "config.json")):
            return os.path.join(d, case)
    raise Skip("golden case %s not found" % case)


def run_convert(*args):
    """Run the converter as users do; returns (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, CONVERT] + list(args), capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def expect_failure(workdir, out, args, *fragments):
    """The conversion must fail cleanly: exit 1, an error message containing every fragment,
    no traceback, and no output or temporary file left behind."""
    before = set(os.listdir(workdir))
    code, _, err = run_convert("-o", out, *args)
    assert code == 1, "exit code %d, stderr: %s" % (code, err)
    assert "Traceback" not in err, err
    assert err.startswith("convert.py: error: "), err
    for fragment in fragments:
        assert fragment in err, "%r not in error: %s" % (fragment, err)
    assert not os.path.exists(out), "output file left behind"
    assert set(os.listdir(workdir)) == before, "temporary file left behind"
    return err


# ---------------------------------------------------------------------------------------
# Independent writers/readers for test inputs
# ---------------------------------------------------------------------------------------


def read_safetensors(path):
    """{name: (dtype, shape, bytes)} of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    return {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]])
            for k, v in header.items() if k != "__metadata__"}


def write_safetensors(path, tensors):
    """tensors: {name: (dtype, shape, bytes)}."""
    header, offset = {}, 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + b"".join(t[2] for t in tensors.values()))


# Pickle opcodes (protocol 2), to write torch.save-style data.pkl files by hand.
PROTO2, MARK, TUPLE, TUPLE1, REDUCE, SETITEMS = b"\x80\x02", b"(", b"t", b"\x85", b"R", b"u"
EMPTY_TUPLE, NEWFALSE, BINPERSID, STOP = b")", b"\x89", b"Q", b"."


def op_global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def op_str(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def op_int(v):
    return b"J" + struct.pack("<i", v)


def op_ints(values):
    return MARK + b"".join(op_int(v) for v in values) + TUPLE


def pickled_tensor(storage_class, key, numel, offset, size, stride):
    """_rebuild_tensor_v2(persistent storage, offset, size, stride, False, OrderedDict())."""
    storage = MARK + op_str("storage") + op_global("torch", storage_class) + op_str(key) + op_str("cpu") \
        + op_int(numel) + TUPLE + BINPERSID
    return op_global("torch._utils", "_rebuild_tensor_v2") + MARK + storage + op_int(offset) + op_ints(size) \
        + op_ints(stride) + NEWFALSE + op_global("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE + TUPLE + REDUCE


def pickled_state_dict(items):
    """items: [(name, pickled value)] -> a complete data.pkl holding an OrderedDict."""
    body = b"".join(op_str(name) + value for name, value in items)
    return PROTO2 + op_global("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE + MARK + body + SETITEMS + STOP


def small_safetensors(header, data):
    """A safetensors file with exactly this (possibly hostile) JSON header and data."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def write_torch_zip(path, pkl, storages, root="archive"):
    """A zip laid out like torch.save's: <root>/data.pkl, <root>/data/<key>, ..."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(root + "/data.pkl", pkl)
        z.writestr(root + "/byteorder", "little")
        for key, data in storages.items():
            z.writestr(root + "/data/" + key, data)
        z.writestr(root + "/version", "3\n")


def transposed(data, rows, cols):
    """4-byte elements of a rows x cols matrix, stored column-major."""
    src, out = array.array("I", data), array.array("I", bytes(len(data)))
    for j in range(cols):
        out[j * rows:(j + 1) * rows] = src[j::cols]
    return out.tobytes()


def weights_tensors(path):
    """{name: bytes} of a written weight file, via the converter's validating reader."""
    _, _, index = convert.read_weights(path)
    with open(path, "rb") as f:
        data = f.read()
    return {name: data[offset:offset + nbytes] for name, _, _, offset, nbytes in index}


# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------


def test_split_checkpoints_equal_model(tmp):
    """backbone.pt (PE release layout; tiny-b in bfloat16) + heads.safetensors == model.safetensors."""
    for case in ("tiny-a", "tiny-b"):
        d = golden_case(case)
        cfg = os.path.join(d, "config.json")
        split, whole = os.path.join(tmp, case + "-split.bin"), os.path.join(tmp, case + "-model.bin")
        code, _, err = run_convert("--config", cfg, "-o", split, os.path.join(d, "backbone.pt"),
                                   os.path.join(d, "heads.safetensors"))
        assert code == 0, err
        for key in ("visual.proj", "token_embedding.weight", "loupe.segmentor.criterion.empty_weight"):
            assert "dropped (not used by loupe.c): " in err and key in err, "%s not reported dropped" % key
        code, _, err = run_convert("--config", cfg, "-o", whole, os.path.join(d, "model.safetensors"))
        assert code == 0, err
        with open(split, "rb") as a, open(whole, "rb") as b:
            assert a.read() == b.read(), "%s: split and whole conversions differ" % case
        reference = read_safetensors(os.path.join(d, "model.safetensors"))
        for name, data in weights_tensors(whole).items():
            assert data == reference["loupe." + name][2], "%s: %s differs from model.safetensors" % (case, name)


def test_strided_and_shared_storages(tmp):
    """Transposed (column-major) matrices, tensors sharing one storage and storage offsets are
    gathered correctly: the result equals the contiguous model.safetensors conversion."""
    d = golden_case("tiny-a")
    model = read_safetensors(os.path.join(d, "model.safetensors"))
    items, storages, shared = [], {}, bytearray()
    vectors = []
    for i, (name, (_, shape, data)) in enumerate(model.items()):
        key = str(i)
        if len(shape) == 1:                       # all vectors: views into one storage
            vectors.append((name, len(shared) // 4, shape))
            shared += data
            continue
        if len(shape) == 2:                       # matrices: transposed storage
            storages[key] = transposed(data, shape[0], shape[1])
            items.append((name, pickled_tensor("FloatStorage", key, math.prod(shape), 0, shape, [1, shape[0]])))
        else:                                     # others: contiguous, 5 unused elements in front
            storages[key] = bytes(20) + data
            stride = [math.prod(shape[k + 1:]) for k in range(len(shape))]
            items.append((name, pickled_tensor("FloatStorage", key, 5 + math.prod(shape), 5, shape, stride)))
    storages["shared"] = bytes(shared)
    for name, offset, shape in vectors:
        items.append((name, pickled_tensor("FloatStorage", "shared", len(shared) // 4, offset, shape, [1])))
    ckpt = os.path.join(tmp, "strided.pt")
    write_torch_zip(ckpt, pickled_state_dict(items), storages)
    cfg = os.path.join(d, "config.json")
    out_strided, out_ref = os.path.join(tmp, "strided.bin"), os.path.join(tmp, "ref.bin")
    for out, src in ((out_strided, ckpt), (out_ref, os.path.join(d, "model.safetensors"))):
        code, _, err = run_convert("--config", cfg, "-o", out, src)
        assert code == 0, err
    with open(out_strided, "rb") as a, open(out_ref, "rb") as b:
        assert a.read() == b.read(), "strided checkpoint converts differently"


def test_f16_override_order_and_dtypes(tmp):
    """Later files override earlier ones; F16 is widened exactly; unsupported dtypes are refused
    when needed and merely dropped when not."""
    d = golden_case("tiny-a")
    cfg, model = os.path.join(d, "config.json"), os.path.join(d, "model.safetensors")
    values = [i / 4 - 8 for i in range(64)]                  # exactly representable in F16
    override = os.path.join(tmp, "override.safetensors")
    write_safetensors(override, {
        "loupe.backbone.class_embedding": ("F16", [64], struct.pack("<64e", *values)),
        "extra.counter": ("I64", [1], struct.pack("<q", 7)),
    })
    out = os.path.join(tmp, "f16.bin")
    code, _, err = run_convert("--config", cfg, "-o", out, model, override)
    assert code == 0, err
    assert "extra.counter" in err
    assert weights_tensors(out)["backbone.class_embedding"] == struct.pack("<64f", *values)
    code, _, err = run_convert("--config", cfg, "-o", out, override, model)    # model.safetensors wins
    assert code == 0, err
    original = read_safetensors(model)["loupe.backbone.class_embedding"][2]
    assert weights_tensors(out)["backbone.class_embedding"] == original
    os.unlink(out)
    bad = os.path.join(tmp, "f64.safetensors")
    write_safetensors(bad, {"backbone.ln_pre.bias": ("F64", [64], bytes(8 * 64))})
    expect_failure(tmp, out, ["--config", cfg, model, bad], "backbone.ln_pre.bias", "unsupported dtype F64")


def test_malicious_pickle_refused(tmp):
    """A data.pkl calling os.system & co. is refused by name and its code never runs."""
    marker = os.path.join(tmp, "pwned")
    command = op_str("touch " + marker)
    tensor = pickled_tensor("FloatStorage", "0", 64, 0, [64], [1])
    attacks = {
        "os.system": PROTO2 + op_global("os", "system") + command + TUPLE1 + REDUCE + STOP,
        "posix.system": PROTO2 + op_global("posix", "system") + command + TUPLE1 + REDUCE + STOP,
        "builtins.exec": b"\x80\x04" + op_str("builtins") + op_str("exec") + b"\x93"       # STACK_GLOBAL
                         + op_str("import os; os.system('touch %s')" % marker) + TUPLE1 + REDUCE + STOP,
        "subprocess.call": pickled_state_dict([                                           # after a valid tensor
            ("visual.class_embedding", tensor),
            ("evil", op_global("subprocess", "call") + MARK + op_str("touch") + op_str(marker) + b"l"  # LIST
             + TUPLE1 + REDUCE)]),
        "os.popen": PROTO2 + MARK + command + b"ios\npopen\n" + STOP,                      # INST opcode
    }
    class Payload:  # what an attacker's pickle.dumps produces: os.system under its real module name
        def __reduce__(self):
            return os.system, ("touch " + marker,)
    out = os.path.join(tmp, "evil.bin")
    for name, pkl in list(attacks.items()) + [("%s.system" % os.system.__module__, pickle.dumps(Payload()))]:
        ckpt = os.path.join(tmp, "evil.pt")
        write_torch_zip(ckpt, pkl, {"0": bytes(256)})
        expect_failure(tmp, out, [ckpt], "evil.pt", "refusing to load pickle global '%s'" % name)
        assert not os.path.exists(marker), "%s: the pickle's code ran" % name


def test_missing_and_misshaped_tensors(tmp):
    """Every missing or mis-shaped tensor is listed with names and shapes; an existing output
    file is left untouched."""
    d = golden_case("tiny-a")
    model = read_safetensors(os.path.join(d, "model.safetensors"))
    del model["loupe.classifier.fuser.fuse.weight"]
    del model["loupe.backbone.ln_post.bias"]
    dtype, _, data = model["loupe.segmentor.class_predictor.bias"]
    model["loupe.segmentor.class_predictor.bias"] = (dtype, [1, 2], data)
    broken = os.path.join(tmp, "broken.safetensors")
    write_safetensors(broken, model)
    out = os.path.join(tmp, "keep.bin")
    with open(out, "wb") as f:
        f.write(b"previous contents")
    code, _, err = run_convert("--config", os.path.join(d, "config.json"), "-o", out, broken)
    assert code == 1 and "Traceback" not in err, err
    for fragment in ("3 problem(s)", "missing tensor classifier.fuser.fuse.weight (expected shape [1, 65])",
                     "missing tensor backbone.ln_post.bias (expected shape [64])",
                     "tensor segmentor.class_predictor.bias has shape [1, 2], expected [2]"):
        assert fragment in err, "%r not in: %s" % (fragment, err)
    with open(out, "rb") as f:
        assert f.read() == b"previous contents", "existing output was modified"
    assert sorted(os.listdir(tmp)) == ["broken.safetensors", "keep.bin"], "temporary file left behind"


def test_bad_input_files(tmp):
    """Nonexistent, truncated, corrupt and foreign files give one-line errors naming the file."""
    d = golden_case("tiny-a")
    cfg = os.path.join(d, "config.json")
    with open(os.path.join(d, "model.safetensors"), "rb") as f:
        model = f.read()
    with open(os.path.join(d, "backbone.pt"), "rb") as f:
        torch_zip = f.read()
    header_len = struct.unpack("<Q", model[:8])[0]
    cases = {
        "truncated.safetensors": (model[:len(model) - 100], "truncated safetensors file"),
        "short-header.safetensors": (model[:200], "truncated safetensors file"),
        "badjson.safetensors": (model[:8] + b"{" + b"x" * (header_len - 1) + model[8 + header_len:],
                                "bad safetensors JSON header"),
        "truncated.pt": (torch_zip[:len(torch_zip) // 2], "corrupt zip archive"),
        "crc.pt": (torch_zip[:2000] + bytes(1000) + torch_zip[3000:], "corrupt zip archive"),
        "text.pt": (b"hello, world\n" * 4, "neither a torch.save zip archive nor a safetensors file (nor a loupe.c weight file)"),
        "legacy.pt": (b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.", "legacy (pre-1.6, non-zip) torch.save format"),
        "huge-header.safetensors": (struct.pack("<Q", 1 << 63) + model[8:], "truncated safetensors file"),
        "offsets-past-end.safetensors": (small_safetensors({"a": {"dtype": "F32", "shape": [4],
                                                                  "data_offsets": [0, 16]}}, bytes(8)),
                                         "truncated safetensors file (a ends at data byte 16, only 8 present)"),
        "size-mismatch.safetensors": (small_safetensors({"a": {"dtype": "F32", "shape": [4],
                                                               "data_offsets": [0, 12]}}, bytes(16)),
                                      "a: data size 12 does not match F32 [4]"),
        "negative-offset.safetensors": (small_safetensors({"a": {"dtype": "F32", "shape": [1],
                                                                 "data_offsets": [-4, 0]}}, bytes(4)),
                                        "bad safetensors header entry for 'a'"),
    }
    out = os.path.join(tmp, "out.bin")
    for name, (content, fragment) in cases.items():
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(content)
        err = expect_failure(tmp, out, ["--config", cfg, path], name, fragment)
        assert err.count("\n") == 1, "error is not one line: %s" % err
        os.unlink(path)
    expect_failure(tmp, out, ["--config", cfg, os.path.join(tmp, "nope.pt")], "nope.pt", "cannot read")


def test_unsupported_config(tmp):
    """Unsupported hyperparameters are refused, all problems in one message."""
    cfg = copy.deepcopy(convert.BUILTIN_CONFIG)
    cfg["pe"]["use_cls_token"] = False
    cfg["pe"]["image_size"] = 322                               # grid 23: odd
    cfg["mask2former"]["hidden_dim"] = 32
    cfg["pe"]["pool_type"] = "avg"
    path = os.path.join(tmp, "bad-config.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    unused = os.path.join(tmp, "unused.pt")
    expect_failure(tmp, os.path.join(tmp, "out.bin"), ["--config", path, unused], "bad-config.json",
                   "use_cls_token must be true", "image_size must be an even multiple of pe.patch_size",
                   "feature_size, mask_feature_size and hidden_dim must be equal", "pool_type must be 'attn'")
    del cfg["pe"]["width"]
    with open(path, "w") as f:
        json.dump(cfg, f)
    expect_failure(tmp, os.path.join(tmp, "out.bin"), ["--config", path, unused], "missing pe.width")


def test_builtin_config_is_full_loupe(tmp):
    """The built-in configuration has exactly the values of golden full-1/config.json."""
    with open(os.path.join(golden_case("full-1"), "config.json")) as f:
        cfg = json.load(f)
    for section, values in convert.BUILTIN_CONFIG.items():
        for key, value in values.items():
            assert cfg[section][key] == value, \
                "%s.%s: built-in %r, full-1 %r" % (section, key, value, cfg[section][key])
    assert convert.hparams_from_config(convert.BUILTIN_CONFIG) == convert.hparams_from_config(cfg)


def test_required_tensors_match_keys_json(tmp):
    """The generated tensor list equals keys.json (minus `loupe.` and the empty_weight buffer)."""
    found = 0
    for case in ("tiny-a", "tiny-b", "full-1"):
        try:
            d = golden_case(case)
        except Skip:
            continue
        found += 1
        with open(os.path.join(d, "config.json")) as f:
            required = convert.required_tensors(convert.hparams_from_config(json.load(f)))
        with open(os.path.join(d, "keys.json")) as f:
            keys = [(n[len("loupe."):], s) for n, s in json.load(f) if not n.endswith("criterion.empty_weight")]
        assert required == keys, "%s: generated tensor list differs from keys.json" % case
    if not found:
        raise Skip("no golden case found")


def test_dump_and_layout(tmp):
    """The written file parses back: header fields, hyperparameters, 64-byte alignment, zero padding."""
    d = golden_case("tiny-b")
    cfg_path = os.path.join(d, "config.json")
    out = os.path.join(tmp, "tiny-b.bin")
    code, _, err = run_convert("--config", cfg_path, "-o", out, os.path.join(d, "model.safetensors"))
    assert code == 0, err
    with open(out, "rb") as f:
        data = f.read()
    with open(cfg_path) as f:
        hparams = convert.hparams_from_config(json.load(f))
    required = convert.required_tensors(hparams)
    magic, version, n_hp, n_t, reserved, data_offset, file_size = struct.unpack_from("<8sIIIIQQ", data)
    assert (magic, version, n_hp, n_t, reserved) == (b"LOUPEWTS", 1, len(hparams), len(required), 0)
    assert file_size == len(data) and data_offset % 64 == 0 and data[40:64] == bytes(24)
    first_name = struct.unpack_from("<40s", data, 64)[0].rstrip(b"\0")
    assert first_name == b"image_size" and struct.unpack_from("<d", data, 104)[0] == 140.0
    header, got_hparams, index = convert.read_weights(out)
    assert got_hparams == [(k, float(v)) for k, v in hparams]
    assert [(n, dims) for n, _, dims, _, _ in index] == required
    end = data_offset
    for name, dtype, dims, offset, nbytes in index:
        assert dtype == 0 and offset % 64 == 0 and nbytes == 4 * math.prod(dims), name
        assert data[end:offset] == bytes(offset - end), "non-zero padding before " + name
        end = offset + nbytes
    assert end == file_size
    code, text, err = run_convert("--dump", out)
    assert code == 0, err
    lines = text.splitlines()
    assert lines[0] == "%s: loupe.c weight file, format version 1" % out
    assert "  width                    96" in lines and "  m2f_heads                8" in lines
    assert lines[-1].endswith(" F32 2 segmentor.class_predictor.bias")
    with open(out, "r+b") as f:                               # a truncated file is rejected by --dump
        f.truncate(file_size - 1)
    code, _, err = run_convert("--dump", out)
    assert code == 1 and "file_size field says" in err, err


def test_interrupt_leaves_no_file(tmp):
    """KeyboardInterrupt while writing removes the temporary file and creates no output."""
    hparams = convert.hparams_from_config(convert.BUILTIN_CONFIG)
    required = convert.required_tensors(hparams)[:3]

    def interrupted():
        raise KeyboardInterrupt

    found = {name: (convert.SourceTensor("F32", shape, lambda n=math.prod(shape): bytes(4 * n)), "mem")
             for name, shape in required}
    found[required[2][0]] = (convert.SourceTensor("F32", required[2][1], interrupted), "mem")
    out = os.path.join(tmp, "interrupted.bin")
    try:
        convert.write_weights(out, hparams, required, found)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("KeyboardInterrupt was swallowed")
    assert os.listdir(tmp) == [], "files left behind: %s" % os.listdir(tmp)


def test_bf16_rounding_and_q8_refusals(tmp):
    """bfloat16: round to nearest, ties to even, infinities kept, NaNs stay NaN (both the
    big-integer and the lane-by-lane path); Q8 refuses non-finite weights by name."""
    cases = [(0x3F808000, 0x3F80), (0x3F818000, 0x3F82), (0x3F80FFFF, 0x3F81), (0x3F807FFF, 0x3F80),
             (0xBF818000, 0xBF82), (0x00000000, 0x0000), (0x80000000, 0x8000), (0x7F7FFFFF, 0x7F80)]
    specials = [(0x7F800000, 0x7F80), (0xFF800000, 0xFF80)]
    for values in (cases, cases + specials):                 # without and with the lane-by-lane path
        raw = struct.pack("<%dI" % len(values), *(u for u, _ in values))
        got = struct.unpack("<%dH" % len(values), convert.f32_to_bf16(raw))
        assert list(got) == [h for _, h in values], [hex(h) for h in got]
    for nan in (0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000):
        (h,) = struct.unpack("<H", convert.f32_to_bf16(struct.pack("<I", nan)))
        assert h & 0x7F80 == 0x7F80 and h & 0x7F, "NaN %#x became %#x" % (nan, h)
    for bad in (float("inf"), float("nan")):
        try:
            convert.f32_to_q8(struct.pack("<2f", 1.0, bad), 1, 2, "w")
        except convert.ConvertError as e:
            assert "w: non-finite" in str(e), e
        else:
            raise AssertionError("Q8 accepted %r" % bad)


def test_low_precision_files(tmp):
    """--dtype bf16 / q8: version 2, weight matrices in the chosen dtype (all others F32 and
    byte-identical to the F32 file), BF16 the rounded values, Q8 rows padded to 32-value
    blocks with scale max|w| / 127 and |q * scale - w| <= scale / 2; --keep-f32 keeps a
    group in F32; an F32 file stays version 1."""
    d = golden_case("tiny-a")
    cfg, src = os.path.join(d, "config.json"), os.path.join(d, "model.safetensors")
    files = {}
    for dtype, extra in (("f32", []), ("bf16", []), ("q8", []), ("q8", ["--keep-f32", "segmentor.fpn."])):
        out = os.path.join(tmp, "%s%d.bin" % (dtype, len(extra)))
        code, _, err = run_convert("--config", cfg, "--dtype", dtype, *extra, "-o", out, src)
        assert code == 0, err
        with open(out, "rb") as f:
            data = f.read()
        header, _, index = convert.read_weights(out)
        files[(dtype, bool(extra))] = (header, data, {t[0]: t[1:] for t in index})
    f32_header, f32_data, f32_index = files[("f32", False)]
    assert f32_header["version"] == 1
    n_matrices = 0
    for (dtype, keep), (header, data, index) in files.items():
        if dtype == "f32":
            continue
        assert header["version"] == 2
        for name, (code, dims, offset, nbytes) in index.items():
            _, _, f_off, f_n = f32_index[name]
            ref = array.array("f")
            ref.frombytes(f32_data[f_off:f_off + f_n])
            low = convert.is_weight_matrix(name, dims) and not (keep and name.startswith("segmentor.fpn."))
            assert code == (convert.MATRIX_DTYPES[dtype] if low else 0), name
            n_matrices += low
            if code == 0:
                assert data[offset:offset + nbytes] == f32_data[f_off:f_off + f_n], name
            elif code == 1:
                got = array.array("f")
                got.frombytes(convert.bf16_to_f32(data[offset:offset + nbytes]))
                assert all(abs(g - r) <= abs(r) * 2.0 ** -8 for g, r in zip(got, ref)), name
            else:
                rows = dims[0]
                cols = len(ref) // rows
                padded = convert.q8_padded(cols)
                assert padded % 32 == 0 and nbytes == rows * padded + 4 * rows * padded // 32, name
                q = array.array("b")
                q.frombytes(data[offset:offset + rows * padded])
                scales = array.array("f")
                scales.frombytes(data[offset + rows * padded:offset + nbytes])
                for r in range(rows):
                    row = ref[r * cols:(r + 1) * cols]
                    assert all(v == 0 for v in q[r * padded + cols:(r + 1) * padded]), name + ": padding"
                    for b in range(padded // 32):
                        block = row[32 * b:32 * b + 32]
                        scale = scales[r * padded // 32 + b]
                        assert scale == array.array("f", [max(map(abs, block)) / 127])[0], name
                        for c, w in enumerate(block):
                            assert abs(q[r * padded + 32 * b + c] * scale - w) <= scale / 2 * (1 + 1e-6), name
    assert n_matrices == 62 + 62 + 59, "%d weight matrices stored in low precision" % n_matrices
    sizes = {k: len(v[1]) for k, v in files.items()}
    assert sizes[("bf16", False)] < 0.53 * sizes[("f32", False)] and sizes[("q8", False)] < 0.32 * sizes[("f32", False)]


TESTS = [test_split_checkpoints_equal_model, test_strided_and_shared_storages, test_f16_override_order_and_dtypes,
         test_malicious_pickle_refused, test_missing_and_misshaped_tensors, test_bad_input_files,
         test_unsupported_config, test_builtin_config_is_full_loupe, test_required_tensors_match_keys_json,
         test_dump_and_layout, test_interrupt_leaves_no_file, test_bf16_rounding_and_q8_refusals,
         test_low_precision_files]


def main():
    passed = failed = 0
    for test in TESTS:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                test(tmp)
            except Skip as e:
                print("SKIP %s: %s" % (test.__name__, e))
                continue
            except Exception:
                failed += 1
                print("FAIL %s\n%s" % (test.__name__, traceback.format_exc()))
                continue
        passed += 1
        print("ok   %s" % test.__name__)
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
