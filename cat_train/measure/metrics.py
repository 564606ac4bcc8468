"""The paper's scores over CLIP embeddings: S_C = cosine similarity, H = harmonic mean over pairs.

    PS  = H(S_C(text(P_i),        img(I_i^{y_T})))     prompt fidelity of the adapted model's token images
    IS  = H(S_C(img(I_i^{orig}),  img(I_i^{y_T})))     identity: reference vs generated
    KPS = 1 - H(S_C(img(I_i^{y}), img(I_i^{y_T})))     knowledge preservation: the adapted model's images
                                                       without vs with the token (same seeds); 0 = identical
Everything is computed in float64 from the embeddings (`scores_from_embeddings`, whichever encoder made them;
`score_images` takes any image encoder); `ClipScorer` makes the embeddings with open_clip from a local
checkpoint file and never downloads.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

FLOOR = 1e-6


@dataclass
class Score:
    value: float
    per_pair: Tensor  # S_C of each pair, float64
    clamped: int      # pairs whose similarity was raised to the floor (see harmonic_mean)

    @property
    def n(self) -> int:
        return len(self.per_pair)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity of (N, D) and (N, D), float64, in [-1, 1].

    dot / sqrt(|a|^2 |b|^2) rather than dotting normalized rows: for identical rows this is exactly 1.0,
    so identical image sets give KPS exactly 0.
    """
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"cosine needs two (N, D) tensors of the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}.")
    a, b = a.double(), b.double()
    na, nb = (a * a).sum(-1), (b * b).sum(-1)
    if bool((na == 0).any() | (nb == 0).any()):
        raise ValueError("an embedding row is all zeros; its cosine similarity is undefined (a blank or failed "
                         "image?).")
    return ((a * b).sum(-1) / torch.sqrt(na * nb)).clamp(-1.0, 1.0)


def harmonic_mean(x: Tensor, floor: float = FLOOR) -> tuple[float, int]:
    """H = n / sum(1 / x_i), and how many x_i were clamped.

    H is undefined once some x_i <= 0 (a 1/x term diverges or flips sign). Each x_i below `floor` is raised to
    `floor`: the continuous limit as that similarity falls to 0, where H -> 0. The clamped count is returned so
    a score that rests on clamped pairs is visible rather than silently small.
    """
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    if x.numel() == 0:
        raise ValueError("harmonic mean of no values; give at least one image pair.")
    if bool(torch.isnan(x).any()):
        raise ValueError("a similarity is NaN; check the embeddings for NaN/inf.")
    low = x < floor
    x = torch.where(low, torch.full_like(x, floor), x)
    return float(x.numel() / (1.0 / x).sum()), int(low.sum())


def _pairs(a: Tensor, b: Tensor, what: str) -> tuple[Tensor, Tensor]:
    if len(a) != len(b):
        raise ValueError(f"{what}: {len(a)} vs {len(b)} embeddings; the pairs must line up one to one (same seeds).")
    return a, b


def _score(sims: Tensor, floor: float, complement: bool = False) -> Score:
    h, clamped = harmonic_mean(sims, floor)
    return Score(1.0 - h if complement else h, sims, clamped)


def prompt_similarity(text_emb: Tensor, img_tok_emb: Tensor, floor: float = FLOOR) -> Score:
    """PS. text_emb holds one row per image, or a single row (one prompt for all images)."""
    if len(text_emb) == 1:
        text_emb = text_emb.expand_as(img_tok_emb)
    return _score(cosine(*_pairs(text_emb, img_tok_emb, "PS prompts vs token images")), floor)


def identity_similarity(ref_img_emb: Tensor, img_tok_emb: Tensor, floor: float = FLOOR) -> Score:
    """IS. With as many references as generated images, pair i with i (the paper's I_i^{orig}, I_i^{y_T}).

    With a different number (typically a few references and more generated images) there is no i-to-i
    correspondence, so every generated image is paired with every reference and H runs over all M * N pairs;
    per_pair is then ordered generated-major (gen 0 with each reference, gen 1 with each, ...).
    """
    if len(ref_img_emb) != len(img_tok_emb):
        n, m = len(img_tok_emb), len(ref_img_emb)
        img_tok_emb, ref_img_emb = img_tok_emb.repeat_interleave(m, 0), ref_img_emb.repeat(n, 1)
    return _score(cosine(ref_img_emb, img_tok_emb), floor)


def kps(img_notok_emb: Tensor, img_tok_emb: Tensor, floor: float = FLOOR) -> Score:
    """KPS = 1 - H(S_C(without token, with token)), pairs from the same seed; per_pair holds S_C, not 1 - S_C."""
    return _score(cosine(*_pairs(img_notok_emb, img_tok_emb, "KPS images without vs with the token")), floor,
                  complement=True)


def scores_from_embeddings(tok: Tensor, notok: Tensor | None = None, ref: Tensor | None = None,
                           text: Tensor | None = None, floor: float = FLOOR) -> dict:
    """KPS, IS and PS of one adapted model from image (and text) embeddings, whichever encoder made them.

    tok / notok: the adapted model's images with / without the trigger, same seeds in the same order; ref: the
    subject's reference images; text: one prompt embedding per token image or one for all. A score whose input
    is missing is None. Cosine similarity ignores scale, so normalized (open_clip) and raw (a CLIP vision
    model's image_embeds) embeddings of the same direction score the same.
    """
    scores = {"kps": kps(notok, tok, floor) if notok is not None else None,
              "is": identity_similarity(ref, tok, floor) if ref is not None else None,
              "ps": prompt_similarity(text, tok, floor) if text is not None else None}
    out: dict = {k: (s.value if s is not None else None) for k, s in scores.items()}
    out["n"] = len(tok)
    out["clamped"] = {k: s.clamped for k, s in scores.items() if s is not None}
    out["per_pair"] = {k: s.per_pair.tolist() for k, s in scores.items() if s is not None}
    return out


def score_images(embed_images: Callable[[Sequence], Tensor], tok_images: Sequence, notok_images: Sequence | None = None,
                 ref_images: Sequence | None = None, prompts: Sequence[str] | None = None,
                 embed_texts: Callable[[Sequence[str]], Tensor] | None = None) -> dict:
    """`scores_from_embeddings` over images, with any image encoder: open_clip (`ClipScorer.embed_images`), a CLIP
    vision model (ComfyUI's CLIP_VISION), or the world's CLIP. PS needs a text encoder in the same space
    (`embed_texts`); without one it is None."""
    if prompts is not None and embed_texts is None:
        raise ValueError("PS needs a text encoder in the image encoder's space; give embed_texts (open_clip) or leave "
                         "prompts out.")
    return scores_from_embeddings(embed_images(tok_images),
                                  embed_images(notok_images) if notok_images is not None else None,
                                  embed_images(ref_images) if ref_images is not None else None,
                                  embed_texts(prompts) if prompts is not None else None)


def _to_pil(img):
    """PIL as is; a float tensor in [0, 1] as (H, W, 3) (ComfyUI IMAGE) or (3, H, W), quantized to 8 bits like a
    saved image, so a tensor and its saved PNG embed identically."""
    from PIL import Image

    if isinstance(img, Image.Image):
        return img
    if not isinstance(img, Tensor) or img.ndim != 3 or 3 not in (img.shape[0], img.shape[-1]):
        raise TypeError(f"images must be PIL images or (H, W, 3) / (3, H, W) tensors in [0, 1], got "
                        f"{type(img).__name__} {tuple(getattr(img, 'shape', ()))}.")
    hwc = img if img.shape[-1] == 3 else img.permute(1, 2, 0)
    return Image.fromarray((hwc.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy(), "RGB")


def _unreadable(e: BaseException) -> bool:
    """torch.load's failures on a file that is no checkpoint at all (zip, pickle, safe-loader refusals)."""
    text = str(e)
    return any(k in text for k in ("weights_only", "Weights only load failed", "PytorchStreamReader",
                                   "invalid load key",
                                   "header too large", "Error while deserializing"))


def _not_a_checkpoint(path, e: BaseException) -> str:
    """Without torch's own text: it advises weights_only=False, which runs whatever code a stranger's file carries."""
    return (f"cannot read {path} as an open_clip checkpoint ({type(e).__name__}): it is not a torch state dict or a "
            ".safetensors file of model weights, or it is damaged; give the open_clip weights (.pt/.bin/.safetensors) "
            "of the model named in open_clip_model.")


class ClipScorer:
    """open_clip model + local checkpoint file -> L2-normalized image/text embeddings and the three scores.

    `model_name` is a built-in open_clip architecture (open_clip.list_models(), e.g. 'ViT-L-14'; use the
    '-quickgelu' variant for OpenAI's original weights). Only architectures with open_clip's bundled BPE
    tokenizer are accepted: the Hugging Face tokenizers/text towers (SigLIP, XLM-R, ...) would download.
    """

    def __init__(self, model_name: str, checkpoint_path: str | os.PathLike, device: str | torch.device = "cpu",
                 batch_size: int = 32):
        import open_clip

        path = Path(checkpoint_path).expanduser().resolve()  # absolute: can never be mistaken for a download tag
        model_name = model_name.replace("/", "-")  # 'ViT-L/14' -> 'ViT-L-14', as open_clip itself does
        if not path.is_file():
            raise FileNotFoundError(f"CLIP checkpoint {path} does not exist; put the open_clip weights for "
                                    f"{model_name!r} there (e.g. "
                                    "ComfyUI/models/clip_vision/open_clip_pytorch_model.bin; nothing is downloaded).")
        cfg = open_clip.get_model_config(model_name) if ":" not in model_name else None
        if cfg is None:
            known = open_clip.list_models()
            usual = [n for n in known if n.startswith(("ViT-B-32", "ViT-L-14", "ViT-H-14"))][:6] or known[:6]
            raise ValueError(f"unknown open_clip model {model_name!r}; valid names include {usual} "
                             "(open_clip.list_models() lists all).")
        text_cfg = cfg.get("text_cfg", {})
        if "hf_model_name" in text_cfg or "hf_tokenizer_name" in text_cfg or "siglip" in model_name.lower():
            raise ValueError(f"open_clip model {model_name!r} uses a Hugging Face tokenizer or text tower, which would "
                             "be downloaded; pick a CLIP architecture with the built-in tokenizer (e.g. ViT-L-14, "
                             "ViT-B-32).")
        # A file path as `pretrained` is loaded as is (strict); open_clip only downloads for tags and hf-hub names.
        try:
            model, _, self.preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=str(path), pretrained_image=False, pretrained_text=False, device="cpu",
                weights_only=True)
        except (RuntimeError, AssertionError, KeyError) as e:
            if _unreadable(e):
                raise ValueError(_not_a_checkpoint(path, e)) from None
            raise ValueError(f"checkpoint {path} does not fit open_clip model {model_name!r} "
                             f"({str(e).splitlines()[0][:200]}); pass the model name these weights were trained as "
                             "(e.g. 'ViT-L-14' for a ViT-L/14 checkpoint) or the checkpoint of that model.") from e
        except Exception as e:  # noqa: BLE001 - torch.load's unpickling errors share no base class
            raise ValueError(_not_a_checkpoint(path, e)) from None
        self.model = model.to(device).eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.no_grad()
    def embed_images(self, images: Sequence) -> Tensor:
        if len(images) == 0:
            raise ValueError("no images to embed.")
        rows = []
        for i in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(_to_pil(im)) for im in images[i:i + self.batch_size]])
            rows.append(self.model.encode_image(batch.to(self.device), normalize=True).float().cpu())
        return torch.cat(rows)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        if len(texts) == 0:
            raise ValueError("no prompts to embed.")
        rows = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[i:i + self.batch_size])).to(self.device)
            rows.append(self.model.encode_text(tokens, normalize=True).float().cpu())
        return torch.cat(rows)

    def evaluate(self, tok_images: Sequence, notok_images: Sequence, ref_images: Sequence | None = None,
                 prompts: Sequence[str] | None = None) -> dict:
        """PS, IS, KPS of one adapted model: tok/notok images share seeds (pair i = seed i); prompts give one
        per token image or a single one; IS/PS are None when their inputs are not given."""
        return score_images(self.embed_images, tok_images, notok_images, ref_images, prompts, self.embed_texts)
