"""Pick the index backends named in the settings; code never changes to switch them."""

from __future__ import annotations

from ragline_retriever.backends.base import DenseIndex, LexicalIndex
from ragline_retriever.settings import RetrieverSettings


def make_lexical(settings: RetrieverSettings) -> LexicalIndex:
    if settings.lexical_backend == "none":
        from ragline_retriever.backends.no_lexical import NoLexicalIndex

        return NoLexicalIndex()
    if settings.lexical_backend == "elasticsearch":
        from ragline_retriever.backends.elasticsearch_index import ElasticsearchIndex

        return ElasticsearchIndex(
            settings.es_url,
            api_key=settings.es_api_key,
            prefix=settings.es_index_prefix,
            timeout=settings.write_timeout_s,
            analyzer=settings.es_analyzer,
            collection_analyzers=settings.es_collection_analyzers,
        )
    from ragline_retriever.backends.tantivy_index import TantivyIndex

    return TantivyIndex(settings.data_dir / "tantivy")


def make_dense(settings: RetrieverSettings, dim: int) -> DenseIndex:
    from ragline_retriever.backends.milvus_index import MilvusIndex

    if settings.milvus_uri.endswith(".db"):
        # Milvus Lite creates the file but not its folder.
        from pathlib import Path

        Path(settings.milvus_uri).parent.mkdir(parents=True, exist_ok=True)
    return MilvusIndex(
        settings.milvus_uri,
        dim=dim,
        token=settings.milvus_token,
        prefix=settings.milvus_collection_prefix,
        timeout=settings.write_timeout_s,
    )
