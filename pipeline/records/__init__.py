"""Records: the ledger, encryption at rest, data contracts and the analysts' datasets."""
