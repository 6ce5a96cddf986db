"""The closed-form heads and their exact training systems. Importing the package registers every head
(:mod:`carrot.ridge.heads`), as timm's model package registers its models."""
from carrot.ridge import head, kernel  # registers "ridge", then "kernel" (the order is auto's tie-break)

__all__ = ["head", "kernel"]
