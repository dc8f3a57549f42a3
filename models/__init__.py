"""Model registry: embedded default models, locally built drafts, tokenizer fingerprints.

``models.ensure()`` materialises the registry (configs/models.toml) in the user cache and
returns paths and fingerprints; ``python -m models ensure`` does the same from a shell.
Importing this package never imports torch or transformers (device agents use it too).
"""

from models.registry import ModelSpec, Registry, RegistryError, load_registry
from models.store import Artifact, Materialized, cache_dir, ensure

__all__ = [
    "Artifact",
    "Materialized",
    "ModelSpec",
    "Registry",
    "RegistryError",
    "cache_dir",
    "ensure",
    "load_registry",
]
