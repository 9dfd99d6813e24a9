"""The operations console: server-rendered FastAPI pages over the ledger (see app.py)."""
