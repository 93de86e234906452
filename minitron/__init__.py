"""minitron: make large language models small (prune, distill, quantize, export)."""

from minitron.common import MinitronError

__version__ = "0.1.0"
__all__ = ["MinitronError", "__version__"]
