"""The `doc_id` path convertor of the routes that carry a document id in their path:
`/collections/{collection}/documents/{doc_id:doc_id}` in the gateway and the retriever.

The id comes percent-encoded as one segment (ragline_common.wire.doc_id_path) and the
server decodes the path once, so the parameter is the rest of the path, slashes
included. Starlette's own `path` convertor (`.*`) stops at a line break, and the route's
closing `$` matches before a final one: `/documents/a%0A` would have named document `a`,
and `a%0Ab` met a bare 404. This one takes every character, so such an id reaches the
id check and gets its 422.
"""

from __future__ import annotations

from starlette.convertors import Convertor, register_url_convertor

from ragline_common.wire import doc_id_path


class DocIdConvertor(Convertor[str]):
    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return doc_id_path(value)


register_url_convertor("doc_id", DocIdConvertor())
