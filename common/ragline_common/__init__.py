"""Pieces every ragline service shares. Kept small on purpose: no business logic here."""
