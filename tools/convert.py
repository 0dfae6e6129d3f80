#!/usr/bin/env python3
"""Convert Loupe checkpoints into the loupe.c weight file (parts/FORMAT.md, version 1).

Usage:
    python3 tools/convert.py [--config config.json] [--dtype f32|bf16|q8] -o OUT.bin CKPT [CKPT ...]
    python3 tools/convert.py --dump FILE.bin

CKPT files are applied in order, later ones overriding earlier ones (like upstream's
`checkpoint_paths`).  Accepted inputs:
  * loupe.c weight files (F32 or BF16 tensors), e.g. the randomly initialised heads of
    `loupe init` followed by the PE-Core-L14-336 release checkpoint;
  * PyTorch `torch.save` zip archives (.pt/.pth), read with a restricted unpickler that
    only rebuilds tensors and dicts: a checkpoint can never execute code;
  * .safetensors files.
Source dtypes F32, F16 and BF16 are written as F32, or with --dtype bf16 / q8 the weight
matrices (every linear and convolution weight but the depthwise kernels and the fuser) as
bfloat16 or as int8 with one float32 scale per block of 32 values (format version 2).

Key names: a leading `module.` is stripped; a file with `visual.*` keys is a Perception
Encoder release checkpoint (`visual.X` -> `backbone.X`, everything else is dropped); a
leading `loupe.` (Lightning / Loupe checkpoints) is removed.

Hyperparameters come from --config (the golden config.json format: sections pe, pe_derived,
loupe, mask2former) or, without it, from the built-in full Loupe configuration
(PE-Core-L14-336 + Loupe's test-stage Mask2Former).

Python 3 standard library only.
"""
import argparse
import array
import collections
import contextlib
import io
import itertools
import json
import math
import operator
import os
import pickle
import struct
import sys
import tempfile
import zipfile
import zlib

# --------------------------------------------------------------------------------------
# Output format (parts/FORMAT.md, version 1)
# --------------------------------------------------------------------------------------

MAGIC = b"LOUPEWTS"
FORMAT_VERSION = 2                          # BF16 and Q8 weight matrices
FORMAT_VERSION_F32_ONLY = 1                 # written when every tensor is F32: older readers load it
ALIGN = 64                                  # header size and tensor data alignment
HEADER = struct.Struct("<8sIIIIQQ24x")      # magic, version, n_hparams, n_tensors, reserved, data_offset, file_size
HPARAM = struct.Struct("<40sd")             # NUL-padded name, f64 value
HPARAM_NAME_MAX = 39
INDEX_HEAD = struct.Struct("<HBB")          # name_len, dtype, ndim; then name, u32 dims[ndim], u64 offset, u64 nbytes
INDEX_TAIL = struct.Struct("<QQ")
MAX_NDIM = 4
OUT_DTYPES = {0: "F32", 1: "BF16", 2: "Q8"}  # code -> name
DTYPE_F32, DTYPE_BF16, DTYPE_Q8 = 0, 1, 2
# --dtype -> the code of weight matrices (everything else stays F32)
MATRIX_DTYPES = {"f32": DTYPE_F32, "bf16": DTYPE_BF16, "q8": DTYPE_Q8}
# Q8: int8 values with one float32 scale per block of Q8_BLOCK consecutive values of a
# row (rows padded with zeros to whole blocks), symmetric: scale = max|w| / Q8_MAX.
Q8_BLOCK = 32
Q8_MAX = 127
# Weight tensors (>= 2 dimensions, named *weight) that stay F32: the depthwise kernels
# (9 values a row, nothing to gain), the fuser (one row read by a dot product) and the
# embeddings of the transformer decoder.
F32_WEIGHT_SUFFIXES = (".conv2.weight", "fuser.fuse.weight", "queries_embedder.weight",
                       "queries_features.weight", "level_embed.weight")
assert HEADER.size == ALIGN and HPARAM.size == 48

# Source dtypes this converter can read, with their element sizes.
SOURCE_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}
CHUNK_ELEMS = 1 << 20                       # F16 conversion chunk (elements)

# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


class ConvertError(Exception):
    """An expected failure (bad input, unsupported config...): reported as one line, no traceback."""


# --------------------------------------------------------------------------------------
# Hyperparameters
# --------------------------------------------------------------------------------------

# Full Loupe (stage test), identical to golden full-1/config.json; test/test_convert.py checks it.
BUILTIN_CONFIG = {
    "pe": {
        "image_size": 336, "patch_size": 14, "width": 1024, "layers": 24, "heads": 16,
        "mlp_ratio": 4.0, "attn_pooler_heads": 8, "output_dim": None, "ls_init_value": None,
        "use_abs_posemb": True, "use_cls_token": True, "use_rope2d": True, "pool_type": "attn",
        "use_ln_pre": True, "use_ln_post": True,
    },
    "loupe": {
        "hidden_act": "gelu", "cls_mlp_ratio": 2, "cls_mlp_layers": 2,
        "enable_patch_cls": True, "enable_cls_fusion": True, "enable_conditional_queries": True,
        "tversky_alpha": 0.3, "pixel_forge_weight": 0.8, "pixel_poly_epsilon": 1.0,
        "seg_loss_weight": 1.0, "cls_forge_weight": 0.2, "patch_forge_weight": 0.85,
    },
    "mask2former": {
        "feature_size": 256, "mask_feature_size": 256, "hidden_dim": 256,
        "encoder_feedforward_dim": 1024, "activation_function": "relu", "encoder_layers": 6,
        "decoder_layers": 10, "num_attention_heads": 8, "dim_feedforward": 2048,
        "pre_norm": False, "enforce_input_projection": False, "common_stride": 4,
        "feature_strides": [4, 8, 16, 32], "num_queries": 20, "num_labels": 1,
        "no_object_weight": 0.1, "class_weight": 2, "mask_weight": 5, "dice_weight": 5,
        "train_num_points": 12544, "oversample_ratio": 3.0, "importance_sample_ratio": 0.75,
    },
}

# Constants of the upstream architecture (not configurable there either).
ROPE_THETA = 10000.0
LN_EPS = 1e-5
FPN_LN_EPS = 1e-6           # timm LayerNorm2d in the FPN ScaleBlocks
GN_GROUPS = 32
GN_EPS = 1e-5
DEFORM_LEVELS = 3           # pixel-decoder levels [g/2, g, 2g]
DEFORM_POINTS = 4
POOL_MLP_RATIO = 4          # PE AttentionPooling's MLP ratio
FPN_CONV_KERNEL = 2         # ScaleBlock conv1 (ConvTranspose2d / MaxPool2d) kernel = stride
FPN_DW_KERNEL = 3           # ScaleBlock conv2 (depthwise) kernel
LAYER1_KERNEL = 3           # pixel decoder layer_1 kernel
NUM_PSEUDO_LABELS = 2       # label_embedding.0 (real), .1 (forgery)


def _get(cfg, section, key, problems):
    """cfg[section][key], or None with a problem noted when missing."""
    sec = cfg.get(section)
    if not isinstance(sec, dict) or key not in sec:
        problems.append("missing %s.%s" % (section, key))
        return None
    return sec[key]


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def hparams_from_config(cfg):
    """Map a golden-format config dict to the FORMAT.md hyperparameters (an ordered list of
    (name, value)); raise ConvertError listing every missing key and unsupported setting."""
    problems = []
    pe = {k: _get(cfg, "pe", k, problems) for k in BUILTIN_CONFIG["pe"]}
    lp = {k: _get(cfg, "loupe", k, problems) for k in BUILTIN_CONFIG["loupe"]}
    m2f = {k: _get(cfg, "mask2former", k, problems) for k in BUILTIN_CONFIG["mask2former"]}
    if problems:
        raise ConvertError("config: " + "; ".join(problems))

    int_keys = [("pe", pe, k) for k in ("image_size", "patch_size", "width", "layers", "heads",
                                        "attn_pooler_heads")]
    int_keys += [("loupe", lp, k) for k in ("cls_mlp_ratio", "cls_mlp_layers")]
    int_keys += [("mask2former", m2f, k) for k in (
        "feature_size", "mask_feature_size", "hidden_dim", "encoder_feedforward_dim",
        "encoder_layers", "decoder_layers", "num_attention_heads", "dim_feedforward",
        "num_queries", "num_labels", "train_num_points")]
    for section, values, key in int_keys:
        if not _is_int(values[key]) or values[key] < 1:
            problems.append("%s.%s must be a positive integer (got %r)" % (section, key, values[key]))
    if problems:
        raise ConvertError("config: " + "; ".join(problems))

    def require(ok, what):
        if not ok:
            problems.append(what)

    W, P, S, F = pe["width"], pe["patch_size"], pe["image_size"], m2f["feature_size"]
    require(pe["use_cls_token"] is True, "pe.use_cls_token must be true")
    require(pe["use_abs_posemb"] is True, "pe.use_abs_posemb must be true")
    require(pe["use_rope2d"] is True, "pe.use_rope2d must be true")
    require(pe["pool_type"] == "attn", "pe.pool_type must be 'attn' (got %r)" % pe["pool_type"])
    require(pe["use_ln_pre"] is True and pe["use_ln_post"] is True, "pe.use_ln_pre/use_ln_post must be true")
    require(pe["ls_init_value"] is None, "pe.ls_init_value (layer scale) is not supported")
    require(pe["output_dim"] is None, "pe.output_dim must be null (Loupe drops PE's projection)")
    require(W % (4 * pe["heads"]) == 0,
            "pe.width must be pe.heads x a multiple of 4 (2-D RoPE rotates pairs on two axes)")
    require(W % pe["attn_pooler_heads"] == 0, "pe.width is not divisible by pe.attn_pooler_heads")
    require(S % (2 * P) == 0, "pe.image_size must be an even multiple of pe.patch_size (the FPN has a g/2 level)")
    require(lp["hidden_act"] == "gelu", "loupe.hidden_act must be 'gelu'")
    for key in ("enable_patch_cls", "enable_cls_fusion", "enable_conditional_queries"):
        require(lp[key] is True, "loupe.%s must be true" % key)
    require(F == m2f["mask_feature_size"] == m2f["hidden_dim"],
            "mask2former.feature_size, mask_feature_size and hidden_dim must be equal")
    require(F % m2f["num_attention_heads"] == 0, "mask2former.feature_size is not divisible by num_attention_heads")
    require(F % GN_GROUPS == 0, "mask2former.feature_size must be a multiple of %d (GroupNorm groups)" % GN_GROUPS)
    require(m2f["activation_function"] == "relu", "mask2former.activation_function must be 'relu'")
    require(m2f["pre_norm"] is False, "mask2former.pre_norm must be false")
    require(m2f["enforce_input_projection"] is False, "mask2former.enforce_input_projection must be false")
    require(m2f["common_stride"] == 4 and m2f["feature_strides"] == [4, 8, 16, 32],
            "mask2former.common_stride must be 4 and feature_strides [4, 8, 16, 32]")
    require(m2f["num_labels"] == 1, "mask2former.num_labels must be 1 (Loupe's single 'forgery' label)")

    mlp_width = int(W * pe["mlp_ratio"]) if isinstance(pe["mlp_ratio"], (int, float)) else 0
    require(mlp_width > 0, "pe.mlp_ratio must be a positive number")
    derived = {("pe_derived", "mlp_width"): mlp_width,
               ("pe_derived", "attn_pool_mlp_width"): POOL_MLP_RATIO * W,
               ("pe_derived", "grid"): S // P,
               ("loupe", "cls_head_hidden"): W * lp["cls_mlp_ratio"]}
    for (section, key), value in derived.items():       # cross-check optional derived values
        given = cfg[section].get(key, value) if isinstance(cfg.get(section), dict) else value
        require(given == value, "%s.%s is %r but the config implies %r" % (section, key, given, value))

    for key in ("cls_forge_weight", "patch_forge_weight"):
        v = lp[key]
        require(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1,
                "loupe.%s must be a number between 0 and 1 (got %r)" % (key, v))

    hparams = [
        ("image_size", S), ("patch_size", P), ("width", W), ("layers", pe["layers"]),
        ("heads", pe["heads"]), ("mlp_width", mlp_width), ("pool_heads", pe["attn_pooler_heads"]),
        ("pool_mlp_width", POOL_MLP_RATIO * W), ("rope_theta", ROPE_THETA), ("ln_eps", LN_EPS),
        ("cls_hidden", W * lp["cls_mlp_ratio"]), ("cls_layers", lp["cls_mlp_layers"]),
        ("fpn_ln_eps", FPN_LN_EPS), ("feature_size", F), ("mask_feature_size", m2f["mask_feature_size"]),
        ("hidden_dim", m2f["hidden_dim"]), ("m2f_heads", m2f["num_attention_heads"]),
        ("enc_layers", m2f["encoder_layers"]), ("enc_ffn", m2f["encoder_feedforward_dim"]),
        ("dec_layers", m2f["decoder_layers"]), ("dec_ffn", m2f["dim_feedforward"]),
        ("num_queries", m2f["num_queries"]), ("num_labels", m2f["num_labels"]),
        ("gn_groups", GN_GROUPS), ("gn_eps", GN_EPS), ("deform_levels", DEFORM_LEVELS),
        ("deform_points", DEFORM_POINTS), ("no_object_weight", m2f["no_object_weight"]),
        ("class_weight", m2f["class_weight"]), ("mask_weight", m2f["mask_weight"]),
        ("dice_weight", m2f["dice_weight"]), ("train_num_points", m2f["train_num_points"]),
        ("oversample_ratio", m2f["oversample_ratio"]),
        ("importance_sample_ratio", m2f["importance_sample_ratio"]),
        ("pixel_forge_weight", lp["pixel_forge_weight"]), ("pixel_poly_epsilon", lp["pixel_poly_epsilon"]),
        ("tversky_alpha", lp["tversky_alpha"]), ("seg_loss_weight", lp["seg_loss_weight"]),
        ("cls_forge_weight", lp["cls_forge_weight"]), ("patch_forge_weight", lp["patch_forge_weight"]),
    ]
    for name, value in hparams:
        require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                "hyperparameter %s must be a finite number (got %r)" % (name, value))
    if problems:
        raise ConvertError("unsupported config: " + "; ".join(problems))
    return hparams


# --------------------------------------------------------------------------------------
# The tensors loupe.c needs (upstream state_dict order, without `loupe.` and the constant
# buffer segmentor.criterion.empty_weight)
# --------------------------------------------------------------------------------------


def _linear(prefix, n_out, n_in, bias=True):
    return [(prefix + ".weight", [n_out, n_in])] + ([(prefix + ".bias", [n_out])] if bias else [])


def _norm(prefix, n):
    return [(prefix + ".weight", [n]), (prefix + ".bias", [n])]


def _conv(prefix, n_out, n_in, kernel, bias=True):
    return [(prefix + ".weight", [n_out, n_in, kernel, kernel])] + ([(prefix + ".bias", [n_out])] if bias else [])


def _mha(prefix, d):
    """nn.MultiheadAttention: packed q/k/v input projection + output projection."""
    return [(prefix + ".in_proj_weight", [3 * d, d]), (prefix + ".in_proj_bias", [3 * d])] + \
        _linear(prefix + ".out_proj", d, d)


def _backbone(h):
    W, g, M = h["width"], h["image_size"] // h["patch_size"], h["mlp_width"]
    p = "backbone."
    t = [(p + "class_embedding", [W]), (p + "positional_embedding", [1 + g * g, W]),
         (p + "conv1.weight", [W, 3, h["patch_size"], h["patch_size"]])]
    t += _norm(p + "ln_pre", W) + _norm(p + "ln_post", W)
    for i in range(h["layers"]):
        b = p + "transformer.resblocks.%d." % i
        t += _mha(b + "attn", W) + _norm(b + "ln_1", W) + _norm(b + "ln_2", W)
        t += _linear(b + "mlp.c_fc", M, W) + _linear(b + "mlp.c_proj", W, M)
    t += [(p + "attn_pool.probe", [1, 1, W])] + _mha(p + "attn_pool.attn", W) + _norm(p + "attn_pool.layernorm", W)
    t += _linear(p + "attn_pool.mlp.c_fc", h["pool_mlp_width"], W)
    t += _linear(p + "attn_pool.mlp.c_proj", W, h["pool_mlp_width"])
    return t


def _cls_head(prefix, n_in, hidden, n_layers):
    """LoupeClsHead: (n_layers - 1) hidden Linear layers, then Linear(-> 1)."""
    t, width = [], n_in
    for i in range(n_layers - 1):
        t += _linear("%s.layers.%d" % (prefix, i), hidden, width)
        width = hidden
    return t + _linear("%s.layers.%d" % (prefix, n_layers - 1), 1, width)


def _classifier(h):
    W, g = h["width"], h["image_size"] // h["patch_size"]
    t = _cls_head("classifier.classifier", W, h["cls_hidden"], h["cls_layers"])
    t += _cls_head("classifier.patch_classifier", W, h["cls_hidden"], h["cls_layers"])
    return t + _linear("classifier.fuser.fuse", 1, 1 + g * g, bias=False)


def _scale_block(prefix, W, upsample):
    """FPN ScaleBlock: conv1 (ConvTranspose2d, or a parameter-free MaxPool2d), depthwise conv2, LayerNorm2d."""
    t = _conv(prefix + ".conv1", W, W, FPN_CONV_KERNEL) if upsample else []   # ConvTranspose2d: [in, out, k, k]
    return t + _conv(prefix + ".conv2", W, 1, FPN_DW_KERNEL, bias=False) + _norm(prefix + ".norm", W)


def _segmentor(h):
    W, F = h["width"], h["feature_size"]
    heads, lv, pt = h["m2f_heads"], h["deform_levels"], h["deform_points"]
    s = "segmentor."
    # FPN scale_layers in order 4x (two 2x up-steps), 2x (one), 1x (identity), 0.5x (one max-pool step)
    t = _scale_block(s + "fpn.scale_layers.0.0", W, True) + _scale_block(s + "fpn.scale_layers.0.1", W, True)
    t += _scale_block(s + "fpn.scale_layers.1.0", W, True) + _scale_block(s + "fpn.scale_layers.3.0", W, False)
    t += [(s + "label_embedding.%d" % i, [F]) for i in range(NUM_PSEUDO_LABELS)]
    pd = s + "pixel_decoder."
    t += [(pd + "level_embed", [lv, F])]
    for i in range(lv):
        t += _conv(pd + "input_projections.%d.0" % i, F, W, 1) + _norm(pd + "input_projections.%d.1" % i, F)
    for i in range(h["enc_layers"]):
        e = pd + "encoder.layers.%d." % i
        t += _linear(e + "self_attn.sampling_offsets", heads * lv * pt * 2, F)
        t += _linear(e + "self_attn.attention_weights", heads * lv * pt, F)
        t += _linear(e + "self_attn.value_proj", F, F) + _linear(e + "self_attn.output_proj", F, F)
        t += _norm(e + "self_attn_layer_norm", F)
        t += _linear(e + "fc1", h["enc_ffn"], F) + _linear(e + "fc2", F, h["enc_ffn"])
        t += _norm(e + "final_layer_norm", F)
        t += _mha(e + "cross_attn", F) + _norm(e + "cross_attn_layer_norm", F)
    t += _conv(pd + "mask_projection", F, F, 1)
    t += _conv(pd + "adapter_1.0", F, W, 1, bias=False) + _norm(pd + "adapter_1.1", F)
    t += _conv(pd + "layer_1.0", F, F, LAYER1_KERNEL, bias=False) + _norm(pd + "layer_1.1", F)
    md = s + "mask2former_decoder."
    t += [(md + "queries_embedder.weight", [h["num_queries"], F]),
          (md + "queries_features.weight", [h["num_queries"], F])]
    for i in range(h["dec_layers"] - 1):
        d = md + "decoder.layers.%d." % i
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            t += _linear(d + "self_attn." + proj, F, F)
        t += _norm(d + "self_attn_layer_norm", F) + _mha(d + "cross_attn", F) + _norm(d + "cross_attn_layer_norm", F)
        t += _linear(d + "fc1", h["dec_ffn"], F) + _linear(d + "fc2", F, h["dec_ffn"])
        t += _norm(d + "final_layer_norm", F)
    t += _norm(md + "decoder.layernorm", F)
    for i in range(3):
        t += _linear(md + "decoder.mask_predictor.mask_embedder.%d.0" % i, F, F)
    t += [(md + "level_embed.weight", [lv, F])]
    return t + _linear(s + "class_predictor", h["num_labels"] + 1, F)


def required_tensors(hparams):
    """[(name, shape)] of every tensor loupe.c reads, in upstream state_dict order."""
    h = dict(hparams)
    return _backbone(h) + _classifier(h) + _segmentor(h)


# --------------------------------------------------------------------------------------
# Source tensors (read lazily, converted to F32 bytes)
# --------------------------------------------------------------------------------------


# One tensor of a checkpoint: dtype name ("F32", ...), shape (list) and read() -> its C-order
# bytes in that dtype.  Immutable, so a crafted pickle cannot alter it after creation.
SourceTensor = collections.namedtuple("SourceTensor", "dtype shape read")


def bf16_to_f32(raw):
    """Each bfloat16 is the upper half of a float32: interleave two zero bytes per element."""
    raw = bytes(raw)
    out = bytearray(2 * len(raw))
    out[2::4] = raw[0::2]
    out[3::4] = raw[1::2]
    return out


def f16_to_f32(raw):
    n = len(raw) // 2
    out = bytearray()
    for start in range(0, n, CHUNK_ELEMS):
        count = min(CHUNK_ELEMS, n - start)
        values = struct.unpack_from("<%de" % count, raw, 2 * start)
        out += struct.pack("<%df" % count, *values)
    return out


TO_F32 = {"F32": lambda raw: raw, "BF16": bf16_to_f32, "F16": f16_to_f32}


def f32_to_bf16(raw):
    """Round float32s to bfloat16 (nearest, ties to even) and keep the upper halves.

    Works on chunks as one big integer of 32-bit lanes: adding 0x7FFF + the lane's bit 16
    never carries out of a lane below 2^127 in magnitude. A chunk with a larger value, an
    infinity or a NaN (top byte 0x7F or 0xFF) is rounded lane by lane, NaNs kept NaN.
    """
    raw = bytes(raw)
    out = bytearray(len(raw) // 2)
    step = 4 * CHUNK_ELEMS
    for start in range(0, len(raw), step):
        chunk = raw[start:start + step]
        n = len(chunk) // 4
        top = chunk[3::4]
        if b"\x7f" in top or b"\xff" in top:
            lanes = struct.unpack("<%dI" % n, chunk)
            rounded = struct.pack("<%dI" % n, *((u | 0x400000) if u & 0x7FFFFFFF > 0x7F800000
                                                else u + 0x7FFF + ((u >> 16) & 1) for u in lanes))
        else:
            ones = int.from_bytes(b"\x01\x00\x00\x00" * n, "little")
            x = int.from_bytes(chunk, "little")
            rounded = (x + 0x7FFF * ones + ((x >> 16) & ones)).to_bytes(4 * n, "little")
        out[start // 2:start // 2 + 2 * n:2] = rounded[2::4]
        out[start // 2 + 1:start // 2 + 2 * n:2] = rounded[3::4]
    return out


def q8_padded(cols):
    return (cols + Q8_BLOCK - 1) // Q8_BLOCK * Q8_BLOCK


def f32_to_q8(raw, rows, cols, name):
    """int8 rows padded to whole blocks, then the float32 scale of every block (format
    version 2, Q8). q = round-half-even(w / scale), scale = max|w| of the block / 127
    rounded to float32; an all-zero block has scale 0."""
    values = array.array("f")
    values.frombytes(bytes(raw))
    padded = q8_padded(cols)
    if padded != cols:
        rows_padded, zeros = array.array("f"), array.array("f", bytes(4 * (padded - cols)))
        for r in range(rows):
            rows_padded += values[r * cols:(r + 1) * cols]
            rows_padded += zeros
        values = rows_padded
    magnitudes = [map(abs, values[k::Q8_BLOCK]) for k in range(Q8_BLOCK)]
    scales = array.array("f", map(operator.truediv, map(max, *magnitudes), itertools.repeat(float(Q8_MAX))))
    divisors = [s if s else 1.0 for s in scales]
    per_value = itertools.chain.from_iterable(map(itertools.repeat, divisors, itertools.repeat(Q8_BLOCK)))
    try:
        q = array.array("b", map(round, map(operator.truediv, values, per_value)))
    except (ValueError, OverflowError):
        raise ConvertError("%s: non-finite weights cannot be stored as Q8" % name)
    return q.tobytes() + scales.tobytes()


def tensor_nbytes(dtype, shape):
    """Bytes of a tensor stored as dtype (a Q8 tensor is the matrix [shape[0]][the rest])."""
    numel = math.prod(shape)
    if dtype == DTYPE_Q8:
        rows = shape[0]
        padded = q8_padded(numel // rows)
        return rows * padded + 4 * rows * (padded // Q8_BLOCK)
    return {DTYPE_F32: 4, DTYPE_BF16: 2}[dtype] * numel


def is_weight_matrix(name, shape):
    """True for the tensors --dtype bf16/q8 stores in low precision."""
    return (len(shape) >= 2 and (name.endswith(".weight") or name.endswith("in_proj_weight"))
            and not name.endswith(F32_WEIGHT_SUFFIXES))


def encode_tensor(data, dtype, shape, name):
    """F32 bytes of a tensor -> its bytes in the output dtype."""
    if dtype == DTYPE_BF16:
        return f32_to_bf16(data)
    if dtype == DTYPE_Q8:
        return f32_to_q8(data, shape[0], math.prod(shape) // shape[0], name)
    return data


def strided_bytes(buf, itemsize, offset, shape, stride):
    """C-order bytes of the view (offset, shape, stride; in elements) into buf.

    Dimensions that are laid out contiguously relative to each other are merged first, so a
    contiguous tensor becomes a single slice; otherwise rows are gathered with strided slices.
    """
    if 0 in shape:
        return b""
    dims = []
    for n, s in zip(shape, stride):
        if n == 1:
            continue
        if dims and dims[-1][1] == s * n:
            dims[-1] = (dims[-1][0] * n, s)
        else:
            dims.append((n, s))
    mv = memoryview(buf).cast("B")
    if not dims:
        return mv[offset * itemsize:(offset + 1) * itemsize]
    inner_n, inner_s = dims[-1]
    if len(dims) == 1 and inner_s == 1:
        return mv[offset * itemsize:(offset + inner_n) * itemsize]
    elems = mv.cast({1: "B", 2: "H", 4: "I", 8: "Q"}[itemsize])
    out = bytearray()
    for index in itertools.product(*(range(n) for n, _ in dims[:-1])):
        start = offset + sum(i * s for i, (_, s) in zip(index, dims))
        out += elems[start:start + inner_n * inner_s:inner_s].tobytes()
    return out


# --------------------------------------------------------------------------------------
# safetensors reader
# --------------------------------------------------------------------------------------

SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors(path, file_size):
    """{name: SourceTensor} of a .safetensors file (header validated, data read lazily)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > file_size - 8:
            raise ConvertError("%s: truncated safetensors file (header of %d bytes, file has %d)"
                               % (path, header_len, file_size))
        if header_len > SAFETENSORS_MAX_HEADER:
            raise ConvertError("%s: safetensors header too large (%d bytes)" % (path, header_len))
        try:
            header = json.loads(f.read(header_len).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ConvertError("%s: bad safetensors JSON header (%s)" % (path, e))
    if not isinstance(header, dict):
        raise ConvertError("%s: bad safetensors JSON header (not an object)" % path)
    data_start, data_size = 8 + header_len, file_size - 8 - header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (isinstance(dtype, str) and isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)
                  and _is_int(begin) and _is_int(end) and 0 <= begin <= end)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ConvertError("%s: bad safetensors header entry for %r" % (path, name))
        if dtype in SOURCE_ITEMSIZE and end - begin != SOURCE_ITEMSIZE[dtype] * math.prod(shape):
            raise ConvertError("%s: %s: data size %d does not match %s %s" % (path, name, end - begin, dtype, shape))
        if end > data_size:
            raise ConvertError("%s: truncated safetensors file (%s ends at data byte %d, only %d present)"
                               % (path, name, end, data_size))
        tensors[name] = SourceTensor(dtype, list(shape), _file_range_reader(path, data_start + begin, end - begin))
    return tensors


def _file_range_reader(path, start, nbytes):
    def read():
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(nbytes)
        if len(data) != nbytes:
            raise ConvertError("%s: file shrank while reading" % path)
        return data
    return read


# --------------------------------------------------------------------------------------
# torch.save zip reader with a restricted unpickler
# --------------------------------------------------------------------------------------

# torch.<X>Storage -> dtype name.  Storage classes are only used as tags here; types other
# than F32/F16/BF16 may appear in a checkpoint (e.g. int64 buffers) and are refused only if
# loupe.c needs such a tensor.
STORAGE_DTYPES = {
    "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16", "DoubleStorage": "F64",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL",
}
STORAGE_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2,
                    "I8": 1, "U8": 1, "BOOL": 1}
ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")   # signature, ..., file name length, extra length
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError, zlib.error,
              struct.error)


# Stand-in for a torch.<X>Storage class inside the pickle.
_StorageTag = collections.namedtuple("_StorageTag", "dtype")
# A storage of the archive: zip member `<root>/data/<key>` holding numel elements of dtype.
_Storage = collections.namedtuple("_Storage", "archive member dtype numel")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """Stand-in for torch._utils._rebuild_tensor_v2: records the view, reads nothing yet."""
    if not (isinstance(storage, _Storage) and _is_int(storage_offset) and isinstance(size, tuple)
            and isinstance(stride, tuple) and len(size) == len(stride)
            and all(_is_int(v) and v >= 0 for v in size + stride + (storage_offset,))):
        raise pickle.UnpicklingError("malformed tensor record")
    archive = storage.archive
    return SourceTensor(storage.dtype, list(size),
                        lambda: archive.read_view(storage, storage_offset, size, stride))


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    """Stand-in for torch._utils._rebuild_parameter(_with_state): a parameter is its tensor."""
    return data


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only build dicts and tensor records: every other global is refused."""

    ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    }

    def __init__(self, data, archive):
        super().__init__(io.BytesIO(data))
        self.archive = archive

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageTag(STORAGE_DTYPES[name])
        raise ConvertError("%s: refusing to load pickle global '%s.%s' (only tensor state dicts are "
                           "accepted; save the state dict alone or use safetensors)"
                           % (self.archive.path, module, name))

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageTag) and isinstance(pid[2], str) and _is_int(pid[4])):
            raise pickle.UnpicklingError("unsupported persistent id %r" % (pid,))
        return self.archive.storage(pid[1].dtype, pid[2], pid[4])


class TorchArchive:
    """A torch.save zip archive: unpickles `<root>/data.pkl`, reads tensor data lazily."""

    def __init__(self, path):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
        except ZIP_ERRORS as e:
            raise ConvertError("%s: corrupt zip archive (%s)" % (path, e))
        try:
            self.obj = self._unpickle()
        except BaseException:
            self.zip.close()
            raise

    def _unpickle(self):
        names = self.zip.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ConvertError("%s: zip archive without <root>/data.pkl: not a torch.save checkpoint" % self.path)
        self.root = pkl[0][:-len("data.pkl")]
        byteorder = self.root + "byteorder"
        if byteorder in names and self._read_member(self.zip.getinfo(byteorder)).strip() != b"little":
            raise ConvertError("%s: big-endian checkpoints are not supported" % self.path)
        data = self._read_member(self.zip.getinfo(pkl[0]))
        try:
            return RestrictedUnpickler(data, self).load()
        except ConvertError:
            raise
        except Exception as e:      # UnpicklingError, EOFError, TypeError, ... from a malformed data.pkl
            raise ConvertError("%s: cannot unpickle data.pkl (%s: %s)" % (self.path, type(e).__name__, e))

    def close(self):
        self.zip.close()

    def storage(self, dtype, key, numel):
        member = self.root + "data/" + key
        try:
            info = self.zip.getinfo(member)
        except KeyError:
            raise ConvertError("%s: storage %s is missing from the archive" % (self.path, member))
        if numel < 0 or (dtype in STORAGE_ITEMSIZE and info.file_size != numel * STORAGE_ITEMSIZE[dtype]):
            raise ConvertError("%s: storage %s has %d bytes, expected %d elements of %s"
                               % (self.path, member, info.file_size, numel, dtype))
        return _Storage(self, info, dtype, numel)

    def read_view(self, storage, offset, size, stride):
        """C-order bytes of a tensor view; reads only the storage span the view touches."""
        if 0 in size:
            return b""
        itemsize = SOURCE_ITEMSIZE[storage.dtype]
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel:
            raise ConvertError("%s: tensor view exceeds its storage %s" % (self.path, storage.member.filename))
        span = self._read_member(storage.member, offset * itemsize, (last + 1 - offset) * itemsize)
        return strided_bytes(span, itemsize, 0, size, stride)

    def _read_member(self, info, start=0, nbytes=None):
        """Bytes [start, start + nbytes) of a member (default: all). Whole members go through zipfile
        (CRC checked); parts of an uncompressed member (views of a shared storage) are read in place."""
        nbytes = info.file_size - start if nbytes is None else nbytes
        try:
            if (start == 0 and nbytes == info.file_size) or info.compress_type != zipfile.ZIP_STORED:
                return self.zip.read(info)[start:start + nbytes]
            with open(self.path, "rb") as f:
                f.seek(info.header_offset)
                sig, name_len, extra_len = ZIP_LOCAL_HEADER.unpack(f.read(ZIP_LOCAL_HEADER.size))
                if sig != b"PK\x03\x04":
                    raise zipfile.BadZipFile("bad local header of %s" % info.filename)
                f.seek(info.header_offset + ZIP_LOCAL_HEADER.size + name_len + extra_len + start)
                data = f.read(nbytes)
            if len(data) != nbytes:
                raise zipfile.BadZipFile("truncated member %s" % info.filename)
            return data
        except ZIP_ERRORS as e:
            raise ConvertError("%s: corrupt zip archive (%s)" % (self.path, e))


# --------------------------------------------------------------------------------------
# Loading and merging checkpoints
# --------------------------------------------------------------------------------------

LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"   # pickled torch magic number (pre-1.6)


def open_checkpoint(path, stack):
    """{name: SourceTensor} of a checkpoint (format detected from the content); an opened
    archive is closed by the contextlib.ExitStack `stack`."""
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise ConvertError("%s: cannot read (%s)" % (path, e.strerror or e))
    if head.startswith(b"PK"):
        archive = TorchArchive(path)
        stack.callback(archive.close)
        return _state_dict(archive.obj, path)
    if head.startswith(LEGACY_TORCH_MAGIC):
        raise ConvertError("%s: legacy (pre-1.6, non-zip) torch.save format is not supported; "
                           "re-save it with a recent PyTorch" % path)
    if len(head) > 8 and head[8:9] == b"{":
        return read_safetensors(path, file_size)
    if head.startswith(MAGIC):
        return read_loupe_weights(path, stack)
    raise ConvertError("%s: neither a torch.save zip archive nor a safetensors file (nor a loupe.c weight file)" % path)


def read_loupe_weights(path, stack):
    """{name: SourceTensor} of a loupe.c weight file (e.g. written by `loupe init`), so that its
    tensors can be combined with checkpoints: F32 and BF16 tensors are read as they are stored;
    Q8 ones are refused (they are not the original values)."""
    _, _, tensors = read_weights(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ConvertError("%s: cannot read (%s)" % (path, e.strerror or e))
    stack.callback(f.close)
    found = {}
    for name, dtype, dims, offset, nbytes in tensors:
        if dtype == DTYPE_Q8:
            raise ConvertError("%s: tensor %s is stored as Q8; combine F32 or BF16 weight files only" % (path, name))

        def read(offset=offset, nbytes=nbytes):
            f.seek(offset)
            data = f.read(nbytes)
            if len(data) != nbytes:
                raise ConvertError("%s: truncated tensor data" % path)
            return data
        found[name] = SourceTensor(OUT_DTYPES[dtype], list(dims), read)
    return found


def _state_dict(obj, path):
    """The tensor dict inside an unpickled checkpoint (top level, 'state_dict' or 'weights')."""
    if isinstance(obj, dict):
        for key in ("state_dict", "weights"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise ConvertError("%s: checkpoint does not contain a state dict" % path)
    return {k: v for k, v in obj.items() if isinstance(v, SourceTensor)}


def normalize_keys(state_dict):
    """{checkpoint key: loupe.c name, or None for a key that is dropped}."""
    keys = [k[len("module."):] if k.startswith("module.") else k for k in state_dict]
    pe_release = any(k.startswith("visual.") for k in keys)
    mapping = {}
    for original, key in zip(state_dict, keys):
        if pe_release:
            key = "backbone." + key[len("visual."):] if key.startswith("visual.") else None
        elif key.startswith("loupe."):
            key = key[len("loupe."):]
        mapping[original] = key
    return mapping


def gather_tensors(paths, required, stack):
    """Merge checkpoints in order, later overriding earlier. Returns ({name: (SourceTensor,
    path)} of the needed tensors, [(path, key)] of the dropped ones)."""
    needed = {name for name, _ in required}
    found, dropped = {}, []
    for path in paths:
        state_dict = open_checkpoint(path, stack)
        for original, name in normalize_keys(state_dict).items():
            if name in needed:
                found[name] = (state_dict[original], path)
            else:
                dropped.append((path, original))
    return found, dropped


def check_tensors(found, required):
    """Raise ConvertError listing every missing, mis-shaped or unsupported-dtype tensor."""
    problems = []
    for name, shape in required:
        if name not in found:
            problems.append("missing tensor %s (expected shape %s)" % (name, shape))
            continue
        tensor, path = found[name]
        if tensor.shape != shape:
            problems.append("%s: tensor %s has shape %s, expected %s" % (path, name, tensor.shape, shape))
        if tensor.dtype not in SOURCE_ITEMSIZE:
            problems.append("%s: tensor %s has unsupported dtype %s (supported: %s)"
                            % (path, name, tensor.dtype, ", ".join(SOURCE_ITEMSIZE)))
    if problems:
        shape_hint = ["(shapes follow from the hyperparameters: does --config match these checkpoints?)"]
        lines = problems + (shape_hint if any(" has shape " in p for p in problems) else [])
        raise ConvertError("%d problem(s):\n  " % len(problems) + "\n  ".join(lines))


# --------------------------------------------------------------------------------------
# Writing and reading the loupe.c weight file
# --------------------------------------------------------------------------------------


def _align(n):
    return (n + ALIGN - 1) // ALIGN * ALIGN


def tensor_dtypes(required, matrix_dtype=DTYPE_F32, keep_f32=()):
    """The output dtype of every required tensor: matrix_dtype for weight matrices whose
    names do not start with one of the keep_f32 prefixes, else F32."""
    return [matrix_dtype if is_weight_matrix(name, shape) and not name.startswith(tuple(keep_f32)) else DTYPE_F32
            for name, shape in required]


def layout(hparams, required, dtypes):
    """(data_offset, [tensor offsets], file_size) of a weight file."""
    index_size = sum(INDEX_HEAD.size + len(n.encode()) + 4 * len(s) + INDEX_TAIL.size for n, s in required)
    data_offset = _align(HEADER.size + HPARAM.size * len(hparams) + index_size)
    offsets, cursor = [], data_offset
    for (_, shape), dtype in zip(required, dtypes):
        offsets.append(_align(cursor))
        cursor = offsets[-1] + tensor_nbytes(dtype, shape)
    return data_offset, offsets, cursor


def encode_metadata(hparams, required, dtypes):
    """Header + hyperparameters + tensor index, zero-padded up to data_offset."""
    data_offset, offsets, file_size = layout(hparams, required, dtypes)
    version = FORMAT_VERSION if any(d != DTYPE_F32 for d in dtypes) else FORMAT_VERSION_F32_ONLY
    out = bytearray(HEADER.pack(MAGIC, version, len(hparams), len(required), 0, data_offset, file_size))
    for name, value in hparams:
        assert len(name) <= HPARAM_NAME_MAX
        out += HPARAM.pack(name.encode(), float(value))
    for (name, shape), offset, dtype in zip(required, offsets, dtypes):
        assert 1 <= len(shape) <= MAX_NDIM
        encoded = name.encode()
        out += INDEX_HEAD.pack(len(encoded), dtype, len(shape)) + encoded
        out += struct.pack("<%dI" % len(shape), *shape) + INDEX_TAIL.pack(offset, tensor_nbytes(dtype, shape))
    out += bytes(data_offset - len(out))
    return out, offsets


def write_weights(out_path, hparams, required, found, dtypes=None):
    """Write the weight file through a temporary file in the same directory, then rename it."""
    dtypes = dtypes or tensor_dtypes(required)
    metadata, offsets = encode_metadata(hparams, required, dtypes)
    directory = os.path.dirname(os.path.abspath(out_path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(out_path) + ".", suffix=".tmp")
    except OSError as e:
        raise ConvertError("%s: cannot create output (%s)" % (out_path, e.strerror or e))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(metadata)
            for (name, shape), offset, dtype in zip(required, offsets, dtypes):
                tensor, _ = found[name]
                data = TO_F32[tensor.dtype](tensor.read())
                if len(data) != 4 * math.prod(shape):
                    raise ConvertError("%s: read %d bytes, expected %d" % (name, len(data), 4 * math.prod(shape)))
                f.write(bytes(offset - f.tell()))
                f.write(encode_tensor(data, dtype, shape, name))
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out_path)
    except OSError as e:
        os.unlink(tmp)
        raise ConvertError("%s: cannot write output (%s)" % (out_path, e.strerror or e))
    except BaseException:
        os.unlink(tmp)
        raise


def read_weights(path):
    """Parse and validate a weight file's header, hyperparameters and tensor index (the tensor
    data is not read): (header dict, [(name, value)], [(name, dtype, dims, offset, nbytes)])."""

    def fail(problem):
        raise ConvertError("%s: %s" % (path, problem))

    try:
        with open(path, "rb") as f:
            actual_size = os.fstat(f.fileno()).st_size
            data = f.read(HEADER.size)
            if len(data) < HEADER.size:
                fail("too short for a loupe.c weight file")
            magic, version, n_hparams, n_tensors, _, data_offset, file_size = HEADER.unpack(data)
            if magic != MAGIC:
                fail("bad magic %r (not a loupe.c weight file)" % magic)
            if not FORMAT_VERSION_F32_ONLY <= version <= FORMAT_VERSION:
                fail("format version %d, this tool reads %d to %d" % (version, FORMAT_VERSION_F32_ONLY, FORMAT_VERSION))
            if file_size != actual_size:
                fail("file_size field says %d bytes, file has %d" % (file_size, actual_size))
            if data_offset % ALIGN or data_offset > file_size:
                fail("bad data_offset %d" % data_offset)
            data += f.read(data_offset - HEADER.size)
    except OSError as e:
        raise ConvertError("%s: cannot read (%s)" % (path, e.strerror or e))
    header = {"version": version, "n_hparams": n_hparams, "n_tensors": n_tensors,
              "data_offset": data_offset, "file_size": file_size}
    pos = HEADER.size
    hparams = []
    try:
        for _ in range(n_hparams):
            raw_name, value = HPARAM.unpack_from(data, pos)
            hparams.append((raw_name.rstrip(b"\0").decode(), value))
            pos += HPARAM.size
        tensors = []
        for _ in range(n_tensors):
            name_len, dtype, ndim = INDEX_HEAD.unpack_from(data, pos)
            pos += INDEX_HEAD.size
            name = data[pos:pos + name_len].decode()
            pos += name_len
            dims = list(struct.unpack_from("<%dI" % ndim, data, pos))
            pos += 4 * ndim
            offset, nbytes = INDEX_TAIL.unpack_from(data, pos)
            pos += INDEX_TAIL.size
            tensors.append((name, dtype, dims, offset, nbytes))
    except (struct.error, UnicodeDecodeError) as e:
        fail("corrupt hyperparameters or tensor index (%s)" % e)
    if pos > data_offset:
        fail("tensor index overlaps the data (ends at %d, data_offset %d)" % (pos, data_offset))
    end = data_offset
    for name, dtype, dims, offset, nbytes in sorted(tensors, key=lambda t: t[3]):
        if dtype not in OUT_DTYPES:
            fail("%s: unknown dtype %d" % (name, dtype))
        if dtype != DTYPE_F32 and version == FORMAT_VERSION_F32_ONLY:
            fail("%s: dtype %s in a format version %d file" % (name, OUT_DTYPES[dtype], version))
        if not 1 <= len(dims) <= MAX_NDIM:
            fail("%s: ndim %d out of range" % (name, len(dims)))
        if offset % ALIGN or offset < end or offset + nbytes > file_size:
            fail("%s: bad offset %d (misaligned, overlapping or past the end)" % (name, offset))
        if nbytes != tensor_nbytes(dtype, dims):
            fail("%s: nbytes %d does not match %s %s" % (name, nbytes, OUT_DTYPES[dtype], dims))
        end = offset + nbytes
    return header, hparams, tensors


def dump(path):
    header, hparams, tensors = read_weights(path)
    print("%s: loupe.c weight file, format version %d" % (path, header["version"]))
    print("  data_offset %d, file_size %d, %d hyperparameters, %d tensors"
          % (header["data_offset"], header["file_size"], header["n_hparams"], header["n_tensors"]))
    print("hyperparameters:")
    for name, value in hparams:
        print("  %-24s %s" % (name, int(value) if value.is_integer() else repr(value)))
    print("tensors: offset nbytes dtype shape name")
    for name, dtype, dims, offset, nbytes in tensors:
        print("  %d %d %s %s %s" % (offset, nbytes, OUT_DTYPES[dtype], "x".join(map(str, dims)), name))


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def load_config(path):
    if path is None:
        return BUILTIN_CONFIG
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except OSError as e:
        raise ConvertError("%s: cannot read (%s)" % (path, e.strerror or e))
    except ValueError as e:
        raise ConvertError("%s: bad JSON (%s)" % (path, e))
    if not isinstance(cfg, dict):
        raise ConvertError("%s: not a JSON object" % path)
    return cfg


def convert(checkpoints, out_path, config_path=None, log=sys.stderr, dtype="f32", keep_f32=()):
    """Convert checkpoints into out_path, weight matrices stored as dtype (f32, bf16, q8)
    except those named keep_f32*; raise ConvertError on any problem (no file is left)."""
    config = load_config(config_path)
    try:
        hparams = hparams_from_config(config)
    except ConvertError as e:
        raise ConvertError("%s: %s" % (config_path or "built-in config", e))
    required = required_tensors(hparams)
    with contextlib.ExitStack() as stack:
        found, dropped = gather_tensors(checkpoints, required, stack)
        check_tensors(found, required)
        dtypes = tensor_dtypes(required, MATRIX_DTYPES[dtype], keep_f32)
        write_weights(out_path, hparams, required, found, dtypes)
    n_params = sum(math.prod(shape) for _, shape in required)
    n_matrix = sum(math.prod(shape) for (_, shape), d in zip(required, dtypes) if d != DTYPE_F32)
    stored = "F32" if not n_matrix else "%d of them as %s" % (n_matrix, OUT_DTYPES[MATRIX_DTYPES[dtype]])
    print("wrote %s: %d tensors, %d parameters (%s), %d bytes"
          % (out_path, len(required), n_params, stored, os.path.getsize(out_path)), file=log)
    for path, key in dropped:
        print("  dropped (not used by loupe.c): %s: %s" % (path, key), file=log)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="*", metavar="CKPT", help=".pt/.pth/.safetensors files, applied in order")
    ap.add_argument("-o", "--output", metavar="OUT.bin", help="weight file to write")
    ap.add_argument("--config", metavar="config.json", help="hyperparameters (golden config.json format)")
    ap.add_argument("--dtype", choices=sorted(MATRIX_DTYPES), default="f32",
                    help="storage of the weight matrices: f32 (default), bf16, or q8 (int8 + a float32 scale "
                         "per %d values)" % Q8_BLOCK)
    ap.add_argument("--keep-f32", action="append", default=[], metavar="PREFIX",
                    help="with --dtype bf16/q8: keep the weight matrices whose names start with PREFIX in F32 "
                         "(repeatable), e.g. segmentor.mask2former_decoder.")
    ap.add_argument("--dump", metavar="FILE.bin", help="print header, hyperparameters and tensor index of FILE")
    args = ap.parse_args(argv)
    if args.dump and (args.checkpoints or args.output):
        ap.error("--dump takes no other arguments")
    if not args.dump and (not args.checkpoints or not args.output):
        ap.error("need -o OUT.bin and at least one checkpoint")
    try:
        if args.dump:
            dump(args.dump)
        else:
            convert(args.checkpoints, args.output, args.config, dtype=args.dtype, keep_f32=args.keep_f32)
    except ConvertError as e:
        print("convert.py: error: %s" % e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("convert.py: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:         # --dump piped into e.g. head: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
