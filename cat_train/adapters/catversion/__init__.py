"""CatVersion (Zhao et al., arXiv 2311.14631): a concept as learnable Keys/Values concatenated in the text encoder.

In chosen self-attention layers of the text encoder, `length` learnable vectors are concatenated to the
projected Keys and Values (before the head split, visible to every token whatever the causal mask):

    Attn(Q, [P_K; K], [P_V; V])

so a prompt's features get a residual towards the concept, while the UNet and every weight of the text
encoder stay frozen. Defaults follow the authors' released adapters (adapter-transformers "flat" prefix
tuning on SD1.5's CLIP ViT-L/14 text model): the last 3 of its 12 self-attention layers (9, 10, 11), one
embedding per layer, initialised N(0, 1), AdamW at lr 1e-2 (their 5e-3 base rate scaled by batch 2),
batch 2, 1000 steps, the ordinary diffusion loss. As their code trains (read in RoyZhao926/CatVersion, not
copied): the caption is the class word, no placeholder (`CatVersionConfig.caption="class"`: the trigger replaced
by the class word), images flipped horizontally with p 0.5 (`flip`), and the sampler's unconditional prompt
encoded without the embeddings (the hosts: the world bench and Apply CatVersion keep them off it). Their code also
adds +1 to the prefix column's attention logit (it concatenates ones to an additive mask); that is
`CatVersionSpec.prefix_bias=1`, off by default (0: the prefix takes part with logit q.k / sqrt(d) like any key).
This pack's earlier choices are options: captions with the trigger (`caption="trigger"`), no flips (`flip=0`).

Attention modules reached: `torch.nn.MultiheadAttention` (self-attention, packed in_proj; the world's
encoder) and modules with `q_proj`/`k_proj`/`v_proj`/`out_proj` called as `(x, mask, optimized_attention)`
(ComfyUI's `comfy.clip_model.CLIPAttention`). The adapter is installed as an instance `forward` on those
modules and removed again, leaving the encoder exactly as found; `prefixed_forward` gives hosts the same
function to install their own way (ComfyUI: as object patches on a clone).

The CAT term composes: with α > 0 the frozen pass is the UNet on y encoded *without* the embeddings,
the adapted pass on y encoded with them (the UNet itself is never adapted).

Training runs in the one loop through `CatVersionAdapter`, an adapter that lives in the text encoder; its
trainer (`train_catversion`, the settings `CatVersionConfig`, the reference sampler) is training/catversion.py and
its flips a batch term (terms/flip.py).

    spec.py        CatVersionSpec, which self-attention layers it reaches, whether embeddings fit an encoder
    embeddings.py  the Keys/Values themselves
    attention.py   the attention with concatenated K/V, installed on an encoder and removed
    files.py       save and load CatVersion files
    adapter.py     the loop's adapter

Imports: the step's conditionings and adapter protocol, adapters/export.py (files). Names below are this package's
public ones (the nodes and tests use them as `catversion.<name>`).
"""
from .adapter import CatVersionAdapter, Encode
from .attention import Switch, disabled, installed, prefixed_forward
from .embeddings import KVEmbeddings, new_embeddings, param_count
from .files import FORMAT, load_catversion, save_catversion
from .spec import PAPER_LAYERS, CatVersionSpec, check_compatible, encoder_info, find_self_attention, resolve_layers

__all__ = ["CatVersionAdapter", "Encode", "Switch", "disabled", "installed", "prefixed_forward", "KVEmbeddings",
           "new_embeddings", "param_count", "FORMAT", "load_catversion", "save_catversion", "PAPER_LAYERS",
           "CatVersionSpec", "check_compatible", "encoder_info", "find_self_attention", "resolve_layers"]
