"""PackInfer for SGLang: grouped, packed cascade attention for batched requests with shared prefixes.

Enable with ``--attention-backend packinfer --radix-cache-backend packinfer`` (the plugin registers
both when the package is installed). See README.md.
"""

__version__ = "0.1.0"
