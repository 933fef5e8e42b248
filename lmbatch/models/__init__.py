"""Models: the built-in tiny models that run offline (builtin.py; `python -m lmbatch.models NAME DIR`
writes one), facts read from a model's config (architecture.py) and from its files (files.py). The
package hands on the names that tests and users import; the product imports the modules.
"""

from lmbatch.models.architecture import is_classifier, kv_cache_bytes_per_token, reads_both_ways
from lmbatch.models.builtin import (
                                    ARCHITECTURES,
                                    BUILTIN,
                                    build_tiny_model,
                                    build_tokenizer,
                                    build_wordpiece_tokenizer,
                                    resolve_model_path,
)
from lmbatch.models.files import model_identity, parameter_count

__all__ = ["ARCHITECTURES", "BUILTIN", "build_tiny_model", "build_tokenizer", "build_wordpiece_tokenizer",
           "is_classifier", "kv_cache_bytes_per_token", "model_identity", "parameter_count", "reads_both_ways",
           "resolve_model_path"]
