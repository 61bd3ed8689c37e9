"""The chapter's three labs (see labs/README.md): `python -m labs.lab1`, `labs.lab2`, `labs.lab3` from the repo root."""
