"""PTQ methods and the quantization engine they share.

To add a method: write methods/<name>.py with a `Method` subclass decorated with
`@METHODS.register("<name>")`, add conf/method/<name>.yaml, and import the module below.
"""

from methods.base import METHODS, Method, MethodReport, QuantResult

# Importing a method module registers it.
import methods.fp  # noqa: E402, F401  isort: skip
import methods.ptq4dm  # noqa: E402, F401  isort: skip
import methods.qdiff  # noqa: E402, F401  isort: skip
import methods.rtn  # noqa: E402, F401  isort: skip
import methods.tfmq  # noqa: E402, F401  isort: skip

__all__ = ["METHODS", "Method", "MethodReport", "QuantResult"]
