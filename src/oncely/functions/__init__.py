"""Function-level idempotency: the ``@idempotent`` decorator and what it is built from."""

from oncely.core.lease import Claimed, current_claim
from oncely.functions.decorator import Idempotent, idempotent

__all__ = ["Claimed", "Idempotent", "current_claim", "idempotent"]
