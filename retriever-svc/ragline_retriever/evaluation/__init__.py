"""Retrieval quality harness (`ragline eval DIR`): BEIR data in, recall/MRR/nDCG out.

It drives the production code paths (ingest, the backends, `search.retrieve`) on a
throw-away embedded index, so the numbers describe the service rather than a copy of it.
"""
