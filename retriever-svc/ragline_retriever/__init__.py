"""ragline retriever-svc: hybrid lexical + dense retrieval fused by reciprocal rank fusion."""
