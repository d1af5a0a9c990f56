"""One pooled httpx.AsyncClient per upstream service, held for the process lifetime."""
