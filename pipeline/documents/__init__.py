"""Documents: statements, their PDFs, codes, templates and the print batch."""
