"""Where the files shipped beside the package live: policy files, contracts, wording, samples.

The package's modules sit at different depths; they find these through this one module, so a
move of a module never changes what it reads.
"""

from __future__ import annotations

from pathlib import Path

# The folder that holds pipeline/, config/, schemas/, templates/ and data_samples/.
PROJECT_DIR = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_DIR / "config"
SCHEMAS_DIR = PROJECT_DIR / "schemas"
TEMPLATES_DIR = PROJECT_DIR / "templates"
SAMPLES_DIR = PROJECT_DIR / "data_samples"
