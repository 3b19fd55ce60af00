"""PTQ methods and the quantization engine they share.

To add a method: write methods/<name>.py with a `Method` subclass decorated with
`@METHODS.register("<name>")`, add conf/method/<name>.yaml, and import the module below.
"""

from methods.base import METHODS, Method, MethodReport, QuantResult

__all__ = ["METHODS", "Method", "MethodReport", "QuantResult"]
