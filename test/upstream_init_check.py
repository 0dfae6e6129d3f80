#!/usr/bin/env python3
"""Checks `loupe init` against upstream's own from-scratch construction (not part of make test).

Usage (needs PyTorch, e.g. Debian's python3-torch, and a checkout of Kamichanw/Loupe):
    python3 test/upstream_init_check.py LOUPE_CHECKOUT CONFIG.json INIT.bin [TORCH_SEED]

Builds upstream's LoupeModel (stage test) for CONFIG with upstream's own code from
LOUPE_CHECKOUT/src/models (pe.py, rope.py, config.py, modeling_loupe.py, modules.py,
configuration_loupe.py) and PyTorch's own initialisers. Packages upstream imports but that
are not needed to construct the model are stand-ins written below: transformers'
PreTrainedModel (post_init applies _init_weights to every module once, children before
parents, as transformers' smart_apply does), ACT2FN, PretrainedConfig, Mask2FormerConfig
(its defaults) and the constructors of the Mask2Former modules Loupe uses (module tree and
parameters only, as in transformers' modeling_mask2former.py); timm's LayerNorm2d and
DropPath, einops, loguru, omegaconf, huggingface_hub; Loupe's loss modules (no parameters).
Then every tensor of INIT.bin (an F32 file of `loupe init --config CONFIG.json`) is
compared with the upstream model's: tensors that upstream sets to a constant must be equal
bit for bit (norms, zero biases, the fuser, the pixel decoder's level embedding, the
deformable attention's sampling-offset grid), random ones must have the same standard
deviation within sampling error and pass a two-sample Kolmogorov-Smirnov test
(sqrt(n m / (n + m)) D < 2.5; weak for tensors of a few hundred values). Prints one line per
difference and a summary; exits 1 when any tensor differs.
"""
import os
import shutil
import subprocess
import sys
import tempfile

STAND_INS = {
    'einops/__init__.py': '''\
def rearrange(*a, **k): raise NotImplementedError
def repeat(*a, **k): raise NotImplementedError
''',

    'huggingface_hub/__init__.py': '''\
def hf_hub_download(**k): raise RuntimeError("offline")
''',

    'loguru/__init__.py': '''\
class _L:
    def __getattr__(self, k): return lambda *a, **kw: None
logger = _L()
''',

    'models/loupe/loss.py': '''\
import torch, torch.nn as nn
class LoupeClsLoss(nn.Module):
    def __init__(self, config): super().__init__()
class LoupeSegLoss(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.register_buffer("empty_weight", torch.tensor([1.0, 0.1]))
''',

    'omegaconf/__init__.py': '''\
class DictConfig(dict):
    def __getattr__(self, k):
        try: return self[k]
        except KeyError: raise AttributeError(k)
class ListConfig(list): pass
class OmegaConf:
    @staticmethod
    def to_container(x, resolve=True): return x
''',

    'timm/__init__.py': '''\
from . import layers
''',

    'timm/layers.py': '''\
import torch.nn as nn
class DropPath(nn.Module):
    def __init__(self, p=0.0): super().__init__()
class LayerNorm2d(nn.LayerNorm):
    def __init__(self, num_channels, eps=1e-6, affine=True): super().__init__(num_channels, eps=eps, elementwise_affine=affine)
''',

    'transformers/__init__.py': '''\
''',

    'transformers/activations.py': '''\
import torch.nn as nn
ACT2FN = {"gelu": nn.functional.gelu, "relu": nn.ReLU()}
''',

    'transformers/configuration_utils.py': '''\
class PretrainedConfig:
    def __init__(self, **kwargs):
        for k, v in kwargs.items(): setattr(self, k, v)
''',

    'transformers/modeling_outputs.py': '''\
class BaseModelOutput: pass
''',

    'transformers/modeling_utils.py': '''\
# transformers' PreTrainedModel.post_init -> initialize_weights: smart_apply, children first,
# each module once (_is_hf_initialized), through the subclass's _init_weights.
import torch, torch.nn as nn
class ModelOutput: pass
class PreTrainedModel(nn.Module):
    def __init__(self, config, *a, **k):
        super().__init__()
        self.config = config
    def _initialize_weights(self, module):
        if getattr(module, "_is_hf_initialized", False): return
        self._init_weights(module)
        module._is_hf_initialized = True
    @torch.no_grad()
    def post_init(self):
        def smart_apply(mod, fn):
            for child in mod.children(): smart_apply(child, fn)
            fn(mod)
        smart_apply(self, self._initialize_weights)
''',

    'transformers/models/__init__.py': '''\
''',

    'transformers/models/mask2former/__init__.py': '''\
class Mask2FormerConfig:
    """The attributes upstream's constructors read (Mask2FormerConfig defaults, then overrides)."""
    def __init__(self, **over):
        d = dict(feature_size=256, mask_feature_size=256, hidden_dim=256, encoder_feedforward_dim=1024,
                 activation_function="relu", encoder_layers=6, decoder_layers=10, num_attention_heads=8,
                 dropout=0.0, dim_feedforward=2048, pre_norm=False, enforce_input_projection=False,
                 common_stride=4, num_queries=100, feature_strides=[4, 8, 16, 32], init_std=0.02,
                 init_xavier_std=1.0, use_auxiliary_loss=True, id2label={0: "forgery"}, label2id={"forgery": 0})
        d.update(over)
        for k, v in d.items(): setattr(self, k, v)
        self.num_labels = len(self.id2label)
''',

    'transformers/models/mask2former/modeling_mask2former.py': '''\
# Constructors (module tree and parameter creation only) of transformers' Mask2Former modules
# that Loupe uses, as read in modeling_mask2former.py; forward passes are not needed here.
import math
import torch, torch.nn as nn
from transformers.activations import ACT2FN

class Mask2FormerPixelDecoderOutput: pass
class Mask2FormerMaskedAttentionDecoderOutput: pass

class Mask2FormerSinePositionEmbedding(nn.Module):
    def __init__(self, num_pos_feats=64, temperature=10000, normalize=False, scale=None):
        super().__init__()

class Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(nn.Module):
    def __init__(self, embed_dim, num_heads, n_levels, n_points):
        super().__init__()
        self.im2col_step = 128
        self.d_model, self.n_levels, self.n_heads, self.n_points = embed_dim, n_levels, num_heads, n_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * n_levels * n_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)

class Mask2FormerPixelDecoderEncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_dim = config.feature_size
        self.self_attn = Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(self.embed_dim, config.num_attention_heads, 3, 4)
        self.self_attn_layer_norm = nn.LayerNorm(self.embed_dim)
        self.dropout = config.dropout
        self.activation_fn = nn.functional.relu
        self.activation_dropout = config.dropout
        self.fc1 = nn.Linear(self.embed_dim, config.encoder_feedforward_dim)
        self.fc2 = nn.Linear(config.encoder_feedforward_dim, self.embed_dim)
        self.final_layer_norm = nn.LayerNorm(self.embed_dim)

class Mask2FormerPixelDecoderEncoderOnly(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.dropout = config.dropout
        self.layers = nn.ModuleList([Mask2FormerPixelDecoderEncoderLayer(config) for _ in range(config.encoder_layers)])

class Mask2FormerPixelDecoder(nn.Module):
    def __init__(self, config, feature_channels):
        super().__init__()
        self.config = config
        F, mask_dim = config.feature_size, config.mask_feature_size
        self.position_embedding = Mask2FormerSinePositionEmbedding(F // 2, normalize=True)
        self.num_feature_levels = 3
        tin = feature_channels[-3:]
        self.transformer_feature_strides = config.feature_strides[-3:]
        self.feature_channels = feature_channels
        self.level_embed = nn.Parameter(torch.Tensor(3, F))
        self.input_projections = nn.ModuleList([nn.Sequential(nn.Conv2d(c, F, kernel_size=1), nn.GroupNorm(32, F)) for c in tin[::-1]])
        self.encoder = Mask2FormerPixelDecoderEncoderOnly(config)
        self.mask_projection = nn.Conv2d(F, mask_dim, kernel_size=1, stride=1, padding=0)
        stride = min(self.transformer_feature_strides)
        self.common_stride = config.common_stride
        self.num_fpn_levels = int(math.log2(stride) - math.log2(self.common_stride))
        lat, out = [], []
        for idx, c in enumerate(self.feature_channels[: self.num_fpn_levels]):
            l = nn.Sequential(nn.Conv2d(c, F, kernel_size=1, bias=False), nn.GroupNorm(32, F))
            o = nn.Sequential(nn.Conv2d(F, F, kernel_size=3, stride=1, padding=1, bias=False), nn.GroupNorm(32, F), nn.ReLU())
            self.add_module("adapter_{}".format(idx + 1), l)
            self.add_module("layer_{}".format(idx + 1), o)
            lat.append(l); out.append(o)
        self.lateral_convolutions = lat[::-1]
        self.output_convolutions = out[::-1]

class Mask2FormerAttention(nn.Module):
    def __init__(self, embed_dim, num_heads, dropout=0.0, is_decoder=False, bias=True):
        super().__init__()
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

class Mask2FormerMaskedAttentionDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_dim = config.hidden_dim
        self.self_attn = Mask2FormerAttention(self.embed_dim, config.num_attention_heads, config.dropout, True)
        self.activation_fn = ACT2FN[config.activation_function]
        self.self_attn_layer_norm = nn.LayerNorm(self.embed_dim)
        self.cross_attn = nn.MultiheadAttention(self.embed_dim, config.num_attention_heads, config.dropout)
        self.cross_attn_layer_norm = nn.LayerNorm(self.embed_dim)
        self.fc1 = nn.Linear(self.embed_dim, config.dim_feedforward)
        self.fc2 = nn.Linear(config.dim_feedforward, self.embed_dim)
        self.final_layer_norm = nn.LayerNorm(self.embed_dim)

class Mask2FormerPredictionBlock(nn.Module):
    def __init__(self, in_dim, out_dim, activation):
        super().__init__()
        self.layers = [nn.Linear(in_dim, out_dim), activation]
        for i, layer in enumerate(self.layers):
            self.add_module(str(i), layer)

class Mask2FormerMLPPredictionHead(nn.Module):
    def __init__(self, input_dim, hidden_dim, output_dim, num_layers=3):
        super().__init__()
        in_dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        out_dims = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = []
        for i, (a, b) in enumerate(zip(in_dims, out_dims)):
            layer = Mask2FormerPredictionBlock(a, b, nn.ReLU() if i < num_layers - 1 else nn.Identity())
            self.layers.append(layer)
            self.add_module(str(i), layer)

class Mask2FormerMaskPredictor(nn.Module):
    def __init__(self, hidden_size, num_heads, mask_feature_size):
        super().__init__()
        self.mask_embedder = Mask2FormerMLPPredictionHead(hidden_size, hidden_size, mask_feature_size)

class Mask2FormerMaskedAttentionDecoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([Mask2FormerMaskedAttentionDecoderLayer(config) for _ in range(config.decoder_layers - 1)])
        self.layernorm = nn.LayerNorm(config.hidden_dim)
        self.mask_predictor = Mask2FormerMaskPredictor(config.hidden_dim, config.num_attention_heads, config.mask_feature_size)

class Mask2FormerTransformerModule(nn.Module):
    def __init__(self, in_features, config):
        super().__init__()
        hidden_dim = config.hidden_dim
        self.num_feature_levels = 3
        self.position_embedder = Mask2FormerSinePositionEmbedding(hidden_dim // 2, normalize=True)
        self.queries_embedder = nn.Embedding(config.num_queries, hidden_dim)
        self.queries_features = nn.Embedding(config.num_queries, hidden_dim)
        self.input_projections = []
        for _ in range(3):
            if in_features != hidden_dim or config.enforce_input_projection:
                self.input_projections.append(nn.Conv2d(in_features, hidden_dim, kernel_size=1))
            else:
                self.input_projections.append(nn.Sequential())
        self.decoder = Mask2FormerMaskedAttentionDecoder(config)
        self.level_embed = nn.Embedding(3, hidden_dim)
''',

}

UPSTREAM = ["models/pe/pe.py", "models/pe/rope.py", "models/pe/config.py", "models/pe/__init__.py",
            "models/loupe/modeling_loupe.py", "models/loupe/modules.py", "models/loupe/configuration_loupe.py"]



def prepare(checkout, tree):
    """Stand-ins and upstream sources in tree/stand_ins and tree/upstream."""
    for rel, text in STAND_INS.items():
        base = "upstream" if rel.startswith("models/") else "stand_ins"
        path = os.path.join(tree, base, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    for rel in UPSTREAM:
        path = os.path.join(tree, "upstream", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copy(os.path.join(checkout, "src", rel), path)
    for rel in ("models/__init__.py", "models/loupe/__init__.py"):
        open(os.path.join(tree, "upstream", rel), "w").close()


if __name__ == "__main__" and os.environ.get("UPSTREAM_INIT_TREE") is None:
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    with tempfile.TemporaryDirectory() as tree:
        prepare(sys.argv[1], tree)
        env = dict(os.environ, UPSTREAM_INIT_TREE=tree, PYTHONDONTWRITEBYTECODE="1")
        sys.exit(subprocess.call([sys.executable, os.path.abspath(__file__)] + sys.argv[1:], env=env))

tree = os.environ["UPSTREAM_INIT_TREE"]
sys.path[:0] = [os.path.join(tree, "stand_ins"), os.path.join(tree, "upstream")]

import json, math, struct, sys
import numpy
import torch
from models.loupe.configuration_loupe import LoupeConfig
from models.loupe.modeling_loupe import LoupeModel
from omegaconf import DictConfig

cfg_path, bin_path, seed = sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 0
cfg = json.load(open(cfg_path))
pe, lp, m2 = cfg["pe"], cfg["loupe"], cfg["mask2former"]
bo = DictConfig({k: pe[k] for k in ("patch_size", "width", "layers", "heads", "mlp_ratio", "output_dim", "ls_init_value",
                                   "image_size", "use_abs_posemb", "use_cls_token", "use_rope2d", "pool_type",
                                   "attn_pooler_heads", "use_ln_pre", "use_ln_post")})
mo = {k: m2[k] for k in ("feature_size", "mask_feature_size", "hidden_dim", "encoder_feedforward_dim", "encoder_layers",
                         "decoder_layers", "num_attention_heads", "dim_feedforward", "num_queries", "init_xavier_std")}
torch.manual_seed(seed)
config = LoupeConfig(stage="test", backbone_overrides=bo, cls_mlp_ratio=lp["cls_mlp_ratio"], cls_mlp_layers=lp["cls_mlp_layers"],
                     enable_conditional_queries=True, mask2former_overrides=mo)
model = LoupeModel(config)
sd = model.state_dict()

data = open(bin_path, "rb").read()
magic, version, n_hp, n_t, _, data_offset, size = struct.unpack_from("<8sIIIIQQ", data, 0)
pos = 64 + 48 * n_hp
ours = {}
for _ in range(n_t):
    nl, dt, nd = struct.unpack_from("<HBB", data, pos); pos += 4
    name = data[pos:pos + nl].decode(); pos += nl
    dims = struct.unpack_from("<%dI" % nd, data, pos); pos += 4 * nd
    off, nb = struct.unpack_from("<QQ", data, pos); pos += 16
    ours[name] = torch.from_numpy(numpy.frombuffer(data, dtype="<f4", count=nb // 4, offset=off).copy()).reshape(dims)

def ks2(a, b):
    a, _ = torch.sort(a.double().flatten()); b, _ = torch.sort(b.double().flatten())
    allv = torch.cat([a, b])
    fa = torch.searchsorted(a, allv, right=True).double() / len(a)
    fb = torch.searchsorted(b, allv, right=True).double() / len(b)
    d = (fa - fb).abs().max().item()
    return d * math.sqrt(len(a) * len(b) / (len(a) + len(b)))

bad = 0
scalars = 0
worst = (0, "")
missing = [k for k in ours if k not in sd]
extra = [k for k in sd if k not in ours and not k.endswith("empty_weight")]
print("tensors: ours %d, upstream %d, missing upstream %s, not in ours %s" % (len(ours), len(sd), missing, extra))
for name, x in ours.items():
    u = sd[name].float()
    if tuple(u.shape) != tuple(x.shape):
        print("SHAPE", name, tuple(u.shape), tuple(x.shape)); bad += 1; continue
    uc = u.numel() > 1 and bool((u == u.flatten()[0]).all())
    if uc or name.endswith("sampling_offsets.bias"):
        same = torch.equal(u, x)
        if not same:
            d = (u - x).abs().max().item()
            print(("CONST " if uc else "GRID  ") + ("close " if d < 1e-6 else "DIFF  ") + name, "max |d| %.3g" % d,
                  u.flatten()[:8].tolist(), x.flatten()[:8].tolist())
            bad += d >= 1e-6
        continue
    n = u.numel()
    if n < 2:
        scalars += 1
        continue
    ru = u.std().item() / x.std().item() if x.std().item() > 0 else math.inf
    k = ks2(u, x)
    tol = 1 + 6 * math.sqrt(1.0 / n) + 0.02 * (n < 50)
    flag = not (1 / tol < ru < tol) or k > 2.5
    if flag or k > worst[0]:
        worst = max(worst, (k, name))
    if flag:
        print("DIST  %-80s n %7d  std upstream %.5g ours %.5g  KS %.2f" % (name, n, u.std().item(), x.std().item(), k))
        bad += 1
print("worst two-sample KS sqrt(n) D: %.2f (%s)" % worst)
print("%d tensors compared (%d of one value, not comparable), %d differ" % (len(ours), scalars, bad))

sys.exit(1 if bad else 0)
